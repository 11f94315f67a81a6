"""Teacher consistency: the teacher that scores must be the teacher that wrote the student's SFT data.

METHODS.md §2: violating it adds a gradient bias no amount of training removes. Stage one checks it
from the student's provenance before loading anything; stage two checks it again from the store.
"""

from __future__ import annotations

import warnings

from lightning_opd.errors import TeacherConsistencyError
from lightning_opd.modeling import model_identity
from lightning_opd.provenance import ModelIdentity, read_provenance


def teacher_consistency(
    *,
    student_path: str,
    teacher: ModelIdentity,
    allow_inconsistent: bool = False,
    declared_sft_teacher: str | None = None,
    log=print,
) -> dict:
    """The manifest's ``teacher_consistency`` section, or TeacherConsistencyError.

    Returns ``{"consistent": bool|None, "allowed": bool, "sft_teacher_fingerprint": ..., "note": ...}``;
    ``consistent`` is None when nothing says who the SFT teacher was.
    """
    provenance = read_provenance(student_path)
    sft_teacher = provenance.sft_teacher_identity if provenance else None
    if sft_teacher is None and declared_sft_teacher:
        sft_teacher = model_identity(declared_sft_teacher)
    if sft_teacher is None:
        message = (
            f"student {student_path} has no provenance naming its SFT teacher, so teacher consistency cannot be "
            "checked; pass --sft-teacher DIR to declare it"
        )
        warnings.warn(message, stacklevel=2)
        return {
            "consistent": None,
            "allowed": allow_inconsistent,
            "sft_teacher_fingerprint": None,
            "note": message,
        }
    if sft_teacher.fingerprint == teacher.fingerprint:
        return {
            "consistent": True,
            "allowed": False,
            "sft_teacher_fingerprint": sft_teacher.fingerprint,
            "note": "",
        }
    message = (
        f"teacher {teacher.short()} is not the student's SFT teacher {sft_teacher.short()}; scoring with another "
        "teacher biases distillation (METHODS.md §2)"
    )
    if not allow_inconsistent:
        raise TeacherConsistencyError(
            message + ". Score with the SFT teacher, or pass --allow-inconsistent-teacher for an experiment"
        )
    log(f"WARNING: {message}; allowed by --allow-inconsistent-teacher and recorded in the manifest")
    return {
        "consistent": False,
        "allowed": True,
        "sft_teacher_fingerprint": sft_teacher.fingerprint,
        "note": message,
    }


def check_store_for_training(manifest, student_fingerprint: str, student_path: str) -> None:
    """Stage two's door: the store must have been sampled by this student and scored consistently."""
    store_student = manifest.student["fingerprint"]
    if store_student != student_fingerprint:
        raise TeacherConsistencyError(
            f"the store was sampled by student {manifest.student['path']} ({store_student}) but you are training "
            f"{student_path} ({student_fingerprint}); Lightning OPD trains the model that produced the rollouts — "
            "pass that model as --student, or regenerate the store from this one"
        )
    consistency = manifest.teacher_consistency or {}
    if consistency.get("consistent") is False and not consistency.get("allowed"):
        raise TeacherConsistencyError(
            "the store's teacher is not the student's SFT teacher and the store records no allowed inconsistency; "
            "regenerate it with the SFT teacher"
        )
