"""Teacher consistency: the teacher that scores must be the teacher that wrote the student's SFT data.

METHODS.md §2: violating it adds a gradient bias no amount of training removes. Stage one checks it
from the student's provenance before loading anything; stage two checks it again from the store. A
teacher behind a server (``--scoring-backend server``) is compared by its behaviour fingerprint
(``fingerprint.py``) when its weights are not at hand: ``served_identity``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lightning_opd.errors import TeacherConsistencyError
from lightning_opd.models.fingerprint import (
    BEHAVIOR_TOLERANCE,
    behavior_distance,
    has_weights,
    local_behavior,
    same_behavior,
    tokenizer_fingerprint,
)
from lightning_opd.models.loading import check_same_tokenizer, load_tokenizer, model_identity
from lightning_opd.models.provenance import ModelIdentity, read_provenance


def _unknown(message: str, allowed: bool, sft_fingerprint: str | None) -> dict:
    """The record of a consistency that cannot be checked: warned about, and said in the manifest."""
    warnings.warn(message, stacklevel=3)
    return {
        "consistent": None,
        "allowed": allowed,
        "sft_teacher_fingerprint": sft_fingerprint,
        "note": message,
    }


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
        return _unknown(message, allow_inconsistent, None)
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


def sft_teacher_behavior(student_path: str, declared_sft_teacher: str | None, device: str = "cpu"):
    """``(behaviour record, SFT teacher identity)`` of the student's SFT teacher, each None when unknown.

    The record stage zero wrote into the provenance, else one computed from the SFT teacher's weights
    where they still are (the provenance's path, or ``--sft-teacher``).
    """
    provenance = read_provenance(student_path)
    sft = provenance.sft_teacher if provenance else None
    if sft and sft.get("behavior"):
        return sft["behavior"], provenance.sft_teacher_identity
    candidates = [sft["path"]] if sft else []
    candidates += [declared_sft_teacher] if declared_sft_teacher and not sft else []
    for path in candidates:
        if has_weights(path):
            identity = provenance.sft_teacher_identity if sft else model_identity(path)
            return local_behavior(path, device), identity
    return None, (provenance.sft_teacher_identity if sft else None)


def behavior_consistency(
    *,
    student_path: str,
    served: dict,
    where: str,
    allow_inconsistent: bool = False,
    declared_sft_teacher: str | None = None,
    device: str = "cpu",
    log=print,
) -> dict:
    """``teacher_consistency`` for a teacher known only by its behaviour record (a server's): the same
    section, with the SFT teacher's probe log-probs compared to ``served`` (``fingerprint.py``)."""
    expected, sft_teacher = sft_teacher_behavior(student_path, declared_sft_teacher, device)
    sft_fingerprint = sft_teacher.fingerprint if sft_teacher else None
    if expected is None:
        message = (
            f"neither the provenance of student {student_path} nor local weights give its SFT teacher's "
            f"behaviour, so teacher consistency with {where} cannot be checked; pass --sft-teacher DIR (its "
            "weights) to check it"
        )
        return _unknown(message, allow_inconsistent, sft_fingerprint)
    if same_behavior(expected, served):
        return {"consistent": True, "allowed": False, "sft_teacher_fingerprint": sft_fingerprint, "note": ""}
    message = (
        f"{where} does not behave like the student's SFT teacher "
        f"{sft_teacher.short() if sft_teacher else declared_sft_teacher}: its log-probs on the fingerprint probe "
        f"differ by up to {behavior_distance(expected, served):.3f} nats (tolerance {BEHAVIOR_TOLERANCE}); "
        "scoring with another teacher biases distillation (METHODS.md §2)"
    )
    if not allow_inconsistent:
        raise TeacherConsistencyError(
            message + ". Serve the SFT teacher, or pass --allow-inconsistent-teacher for an experiment"
        )
    log(f"WARNING: {message}; allowed by --allow-inconsistent-teacher and recorded in the manifest")
    return {"consistent": False, "allowed": True, "sft_teacher_fingerprint": sft_fingerprint, "note": message}


def served_identity(config, served, student_path: str, log=print):
    """``(teacher ModelIdentity, teacher_consistency section)`` for a served teacher (``served``: the
    checked ``stage1.served.ServedTeacher``).

    With weights in ``--teacher`` the server must behave like them (else it serves another model:
    refused, whatever --allow-inconsistent-teacher says), and the gate is today's weight-fingerprint
    comparison with the SFT teacher. Without weights the behaviour fingerprint is the teacher's
    identity, and the gate compares it with the SFT teacher's (``consistency.behavior_consistency``).
    """
    where = f"the teacher server {served.client.url} ({served.model.name})"
    teacher = str(Path(config.teacher).resolve())
    tokenizer_fp = tokenizer_fingerprint(load_tokenizer(config.teacher))
    student = model_identity(student_path)
    check_same_tokenizer(student, ModelIdentity(teacher, "", tokenizer_fp), "stage 1 (scoring)")
    common = dict(
        student_path=student_path,
        allow_inconsistent=config.allow_inconsistent_teacher,
        declared_sft_teacher=config.sft_teacher or None,
        log=log,
    )
    if has_weights(config.teacher):
        named = local_behavior(config.teacher, config.device)
        if not same_behavior(named, served.behavior):
            raise TeacherConsistencyError(
                f"{where} serves another model than --teacher {config.teacher}: their log-probs on the "
                f"fingerprint probe differ by up to {behavior_distance(named, served.behavior):.3f} nats "
                f"(tolerance {BEHAVIOR_TOLERANCE}); serve {config.teacher} there, or point --teacher at the "
                "served model's directory"
            )
        identity = model_identity(config.teacher)
        return identity, teacher_consistency(teacher=identity, **common)
    identity = ModelIdentity(teacher, served.behavior["fingerprint"], tokenizer_fp)
    return identity, behavior_consistency(served=served.behavior, where=where, device=config.device, **common)


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
