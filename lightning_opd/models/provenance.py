"""Provenance files: what a model directory was trained from, so later stages can check the chain.

Every model directory that lightning-opd writes holds ``lopd_provenance.json`` next to the weights:
the stage that made it, the model's own fingerprint, the teacher whose answers it was fine-tuned on
(path, model fingerprint, tokenizer fingerprint), the stage's config, and the provenance of its
parent. Stage one reads the student's ``sft_teacher`` to enforce teacher consistency; stage two
appends the store it trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_opd import __version__
from lightning_opd.config import write_json_atomic
from lightning_opd.errors import InputError

PROVENANCE_FILE = "lopd_provenance.json"


@dataclass
class ModelIdentity:
    path: str
    fingerprint: str
    tokenizer_fingerprint: str
    dtype: str | None = None

    def short(self) -> str:
        return f"{self.path} ({self.fingerprint})"


@dataclass
class Provenance:
    stage: str  # "sft" | "lightning_opd" | "online_opd" | "toy_teacher"
    model_fingerprint: str
    tokenizer_fingerprint: str
    sft_teacher: dict[str, Any] | None  # ModelIdentity as a dict: the teacher consistency anchor
    config: dict[str, Any] = field(default_factory=dict)
    parent: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # e.g. the store a stage-two model trained on
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    lightning_opd_version: str = __version__

    @property
    def sft_teacher_identity(self) -> ModelIdentity | None:
        if not self.sft_teacher:
            return None
        # Other keys (stage zero's "behavior" record of the teacher) are not part of the identity.
        return ModelIdentity(
            **{k: v for k, v in self.sft_teacher.items() if k in ModelIdentity.__dataclass_fields__}
        )


def write_provenance(model_dir: str | Path, provenance: Provenance) -> Path:
    path = Path(model_dir) / PROVENANCE_FILE
    write_json_atomic(path, provenance.__dict__)
    return path


def read_provenance(model_dir: str | Path) -> Provenance | None:
    """The provenance of ``model_dir``, or None when it has none (a model not made by lightning-opd)."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        known = set(Provenance.__dataclass_fields__)
        return Provenance(**{k: v for k, v in data.items() if k in known})
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(
            f"{path} is not a valid provenance file ({e}); delete it or restore it from the run"
        ) from e
