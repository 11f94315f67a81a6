"""Shared fixtures: a character tokenizer and micro Qwen2 models saved as real HF directories."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_opd.toy.models import MICRO_SPEC, build_model
from lightning_opd.toy.tokenizer import build_char_tokenizer

# Two cores are shared by everything on CI machines; more threads only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _session_store_cache(tmp_path_factory):
    """Session-scoped fixtures (micro_store) are built before any per-test fixture: give them a cache too."""
    previous = os.environ.get("LOPD_STORE_CACHE")
    os.environ["LOPD_STORE_CACHE"] = str(tmp_path_factory.mktemp("session-store-cache"))
    yield
    if previous is None:
        os.environ.pop("LOPD_STORE_CACHE", None)
    else:
        os.environ["LOPD_STORE_CACHE"] = previous


@pytest.fixture(autouse=True)
def _private_store_cache(tmp_path, monkeypatch):
    """No test writes the store index into the user's home, and no test sees another test's stores."""
    monkeypatch.setenv("LOPD_STORE_CACHE", str(tmp_path / "store-cache"))


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


def _save_micro(path, seed):
    tokenizer = build_char_tokenizer()
    model = build_model(MICRO_SPEC, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def micro_student_dir(tmp_path_factory):
    """An untrained 1-layer/32-wide Qwen2 student with the char tokenizer (seed 1)."""
    return _save_micro(tmp_path_factory.mktemp("micro_student"), seed=1)


@pytest.fixture(scope="session")
def micro_teacher_dir(tmp_path_factory):
    """An untrained micro teacher (same architecture, seed 2) sharing the student's tokenizer."""
    return _save_micro(tmp_path_factory.mktemp("micro_teacher"), seed=2)


def run_lopd(*args, check=True):
    """Run the real `lopd` command line in a subprocess (as a user would); returns CompletedProcess."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lightning_opd.cli", *map(str, args)], capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"lopd {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def sft_student_dir(tmp_path_factory, micro_teacher_dir):
    """The micro student with provenance naming the micro teacher as its SFT teacher (as stage 0 writes)."""
    from dataclasses import asdict

    from lightning_opd.models.fingerprint import model_fingerprint
    from lightning_opd.models.loading import model_identity
    from lightning_opd.models.provenance import Provenance, write_provenance

    path = tmp_path_factory.mktemp("sft_student") / "model"
    _save_micro(path, seed=1)
    ident = model_identity(path)
    write_provenance(
        path,
        Provenance(
            stage="sft",
            model_fingerprint=model_fingerprint(path),
            tokenizer_fingerprint=ident.tokenizer_fingerprint,
            sft_teacher=asdict(model_identity(micro_teacher_dir)),
        ),
    )
    return path


@pytest.fixture(scope="session")
def opd_prompts(tmp_path_factory):
    from lightning_opd.prompts import write_jsonl
    from lightning_opd.toy.task import sample_problems, to_records

    path = tmp_path_factory.mktemp("opd_prompts") / "opd.jsonl"
    write_jsonl(to_records(sample_problems("opd", 10, digits=(1, 2)), with_solution=True), path)
    return path


def precompute_config(student, teacher, prompts, out, **overrides):
    from pipelines.precompute import PrecomputeConfig

    settings = dict(
        student=str(student),
        teacher=str(teacher),
        prompts=str(prompts),
        out=str(out),
        max_new_tokens=8,
        part_size=4,
        backend="transformers",
        temperature=1.0,
        seed=3,
    )
    settings.update(overrides)
    return PrecomputeConfig(**settings)


@pytest.fixture(scope="session")
def micro_store(tmp_path_factory, sft_student_dir, micro_teacher_dir, opd_prompts):
    """A finalized scored store (10 rollouts, horizon 8, top-3) sampled by ``sft_student_dir``."""
    from pipelines import precompute

    out = tmp_path_factory.mktemp("store") / "store"
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, out, topk=3), log=lambda *_: None
    )
    return out
