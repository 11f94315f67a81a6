"""Shared fixtures: a character tokenizer and micro Qwen2 models saved as real HF directories."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_opd.toy.models import MICRO_SPEC, build_model
from lightning_opd.toy.tokenizer import build_char_tokenizer

# Two cores are shared by everything on CI machines; more threads only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
