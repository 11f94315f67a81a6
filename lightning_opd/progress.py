"""Progress bars for the long loops (stage zero's and stage two's steps, stage one's parts, generation
in eval and SFT, ``store verify``): tqdm, with a rate and an ETA, on stderr only, so stdout and every
JSON output stay clean.

Shown on a terminal and hidden otherwise (a log file gets the status lines, not bar redraws).
``LOPD_PROGRESS=0`` hides them everywhere, ``LOPD_PROGRESS=1`` shows them even when stderr is not a
terminal. Under ``accelerate launch`` only the main process draws (the callers pass ``enabled``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

PROGRESS_ENV = "LOPD_PROGRESS"


def _disable(enabled: bool) -> bool | None:
    """tqdm's ``disable``: True hides, None lets tqdm hide the bar when stderr is not a terminal."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if not enabled or setting in ("0", "false", "no", "off"):
        return True
    return False if setting in ("1", "true", "yes", "on") else None


def shown(enabled: bool = True) -> bool:
    """Whether a bar would be drawn now (for libraries with their own bars, e.g. vLLM's ``use_tqdm``)."""
    disable = _disable(enabled)
    return not disable if disable is not None else sys.stderr.isatty()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr following the rules above (``kwargs`` go to tqdm, e.g. ``initial``)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=_disable(enabled),
        dynamic_ncols=True,
        **kwargs,
    )


def step_bar(start: int, stop: int, desc: str, *, enabled: bool = True) -> tqdm:
    """Iterates ``range(start, stop)`` showing ``step/stop`` (a resumed run starts part-way along)."""
    return progress_bar(
        range(start, stop), total=stop, initial=start, desc=desc, unit="step", enabled=enabled
    )


def write(*values: Any) -> None:
    """``print`` that clears and redraws an active bar instead of writing into it."""
    tqdm.write(" ".join(str(v) for v in values), file=sys.stdout)


class TokenRate:
    """Tokens per second since creation, for the bars' postfix."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> str:
        self.tokens += tokens
        return f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tok/s"
