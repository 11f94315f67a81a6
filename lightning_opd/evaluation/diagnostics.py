"""Rollout health diagnostics from StableOPD (METHODS.md §5), shared by the store, stage two and online runs.

TruncRate: share of rollouts that hit the length limit without EOS. RepRate: share of rollouts whose
last ``window_chars`` characters compress more than ``ratio`` times with zlib; degenerate loops
("the the the ...") compress far better than prose or mathematics, so the ratio separates them
without a tokenizer or a model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from lightning_opd.config import check

REP_WINDOW_CHARS = 10_000
REP_RATIO = 10.0


def is_truncated(finish_reason: str) -> bool:
    """True when the rollout stopped at the length limit ('length') rather than at EOS ('stop')."""
    return finish_reason == "length"


def compression_ratio(text: str) -> float:
    """len(utf-8 bytes) / len(zlib-compressed bytes); 0.0 for empty text."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def is_repetitive(text: str | None, window_chars: int = REP_WINDOW_CHARS, ratio: float = REP_RATIO) -> bool:
    """True when the last ``window_chars`` characters of ``text`` compress more than ``ratio`` times."""
    check(window_chars >= 1, f"window_chars must be >= 1, got {window_chars}")
    check(ratio > 0, f"ratio must be > 0, got {ratio}")
    if not text:
        return False
    return compression_ratio(text[-window_chars:]) > ratio


def trunc_rate(finish_reasons: Iterable[str]) -> float:
    """Share of truncated rollouts; 0.0 for no rollouts."""
    total = truncated = 0
    for reason in finish_reasons:
        total += 1
        truncated += is_truncated(reason)
    return truncated / total if total else 0.0


def rep_rate(
    texts: Iterable[str | None], window_chars: int = REP_WINDOW_CHARS, ratio: float = REP_RATIO
) -> float:
    """Share of repetitive rollouts; 0.0 for no rollouts."""
    total = repetitive = 0
    for text in texts:
        total += 1
        repetitive += is_repetitive(text, window_chars, ratio)
    return repetitive / total if total else 0.0
