"""Rollout sampling with transformers on micro models: conventions, raw log-probs, determinism."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd.errors import ConfigError, InputError
from lightning_opd.stage1.rollout import (
    SamplingConfig,
    TransformersSampler,
    nucleus,
    sample_seed,
)
from lightning_opd.stage1.samplers import make_sampler, vllm_available
from lightning_opd.stage1.vllm_backend import VLLMEngineConfig, _parse_prompt_logprobs
from storage_schemas.logprob_store_v1 import BEHAVIOR_LOGPROBS_DISTRIBUTION

PROMPTS = ["12+34=", "5+6=", "999+1=", "7+80="]  # different lengths: exercises left padding


@pytest.fixture(scope="module")
def sharp_model(micro_student_dir):
    """The micro student with 5x larger (tied) embeddings: peaked, context-dependent next-token
    distributions, so a log-prob taken at the wrong position or temperature cannot pass by accident."""
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    return model


def with_eos_bias(model, tokenizer, bias: float):
    """A copy whose LM head adds ``bias`` to the EOS logit (a biased Linear replaces the tied head)."""
    biased = copy.deepcopy(model)
    weight = biased.get_output_embeddings().weight
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = bias
    biased.lm_head = head
    return biased


def encode(tokenizer, prompts=PROMPTS):
    return [tokenizer(p)["input_ids"] for p in prompts], [f"p{i}" for i in range(len(prompts))]


def naive_logprobs(model, prompt, response, temperature=1.0):
    """Full forward over prompt+response, log-softmax over the whole vocabulary, read each token."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float() / temperature, dim=-1)
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return rows.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def tokens(rollouts):
    return [r.response_ids for r in rollouts]


# ----------------------------------------------------------------------------------------------


def test_config_validation_quotes_the_bad_value():
    with pytest.raises(ConfigError, match="got 1.5"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="got -0.1"):
        SamplingConfig(temperature=-0.1)
    with pytest.raises(ConfigError, match="'onnx'"):
        SamplingConfig(backend="onnx")
    with pytest.raises(ConfigError, match="identical samples"):
        SamplingConfig(temperature=0, n=4)
    assert BEHAVIOR_LOGPROBS_DISTRIBUTION == "raw_logprobs"


def test_records_shapes_and_order(sharp_model, char_tokenizer):
    config = SamplingConfig(n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=3)
    prompt_ids, keys = encode(char_tokenizer)
    rollouts = TransformersSampler(sharp_model, char_tokenizer, config, "cpu").sample(
        prompt_ids, keys, seed=0
    )
    assert [(r.prompt_id, r.sample_index) for r in rollouts] == [(k, s) for k in keys for s in range(2)]
    eos = char_tokenizer.eos_token_id
    for r in rollouts:
        assert r.prompt_ids == prompt_ids[keys.index(r.prompt_id)]
        assert len(r.behavior_logprobs) == len(r.response_ids) >= 1
        assert all(lp <= 0 for lp in r.behavior_logprobs)
        assert r.response_text == char_tokenizer.decode(r.response_ids, skip_special_tokens=True)
        if r.finish_reason == "length":
            assert len(r.response_ids) == 12 and eos not in r.response_ids
        else:
            assert r.finish_reason == "stop" and r.response_ids.index(eos) == len(r.response_ids) - 1


def test_eos_is_included_and_finish_reasons(sharp_model, char_tokenizer):
    eos = char_tokenizer.eos_token_id
    prompt_ids, keys = encode(char_tokenizer)
    config = SamplingConfig(n=4, temperature=1.0, top_p=1.0, max_new_tokens=16, batch_size=8)

    # A moderate bias (p(EOS) ~ 0.1 per step): both endings occur among 16 samples.
    biased = with_eos_bias(sharp_model, char_tokenizer, bias=4.0)
    rollouts = TransformersSampler(biased, char_tokenizer, config, "cpu").sample(prompt_ids, keys, seed=0)
    reasons = {r.finish_reason for r in rollouts}
    assert reasons == {"stop", "length"}, reasons
    for r in rollouts:
        if r.finish_reason == "stop":
            assert r.response_ids[-1] == eos and eos not in r.response_ids[:-1]
            assert char_tokenizer.eos_token not in r.response_text
        else:
            assert len(r.response_ids) == 16 and eos not in r.response_ids
    # The EOS token gets a behaviour log-prob like any other token (the teacher scores the stop too).
    stopped = next(r for r in rollouts if r.finish_reason == "stop")
    reference = naive_logprobs(biased, stopped.prompt_ids, stopped.response_ids)
    assert torch.allclose(torch.tensor(stopped.behavior_logprobs), reference, atol=1e-4)

    # A huge bias: EOS first, and the response is exactly [EOS] with empty text.
    forced = with_eos_bias(sharp_model, char_tokenizer, bias=100.0)
    rollouts = TransformersSampler(forced, char_tokenizer, config, "cpu").sample(
        prompt_ids[:1], keys[:1], seed=0
    )
    for r in rollouts:
        assert (r.response_ids, r.finish_reason, r.response_text) == ([eos], "stop", "")
        assert r.behavior_logprobs[0] == pytest.approx(0.0, abs=1e-4)


def test_behavior_logprobs_equal_a_naive_rescore(sharp_model, char_tokenizer):
    # Sampled at temperature 0.7 / top-p 0.9, yet the stored log-probs are the raw (T=1) ones.
    config = SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=20, batch_size=8)
    prompt_ids, keys = encode(char_tokenizer)
    rollouts = TransformersSampler(sharp_model, char_tokenizer, config, "cpu").sample(
        prompt_ids, keys, seed=3
    )
    worst, worst_tempered = 0.0, 0.0
    for r in rollouts:
        ours = torch.tensor(r.behavior_logprobs)
        worst = max(
            worst, (ours - naive_logprobs(sharp_model, r.prompt_ids, r.response_ids)).abs().max().item()
        )
        tempered = naive_logprobs(sharp_model, r.prompt_ids, r.response_ids, temperature=0.7)
        worst_tempered = max(worst_tempered, (ours - tempered).abs().max().item())
    assert worst < 1e-4
    assert worst_tempered > 1e-2  # the test can tell the raw distribution from the sampling one


def naive_sampling_logprobs(model, prompt, response, temperature, top_p):
    """log q(y): full softmax at ``temperature``, vLLM's nucleus (mass before < top_p), renormalise, log."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    out = []
    for row, token in zip(logits, response):
        probs = torch.softmax(row / temperature, dim=-1)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        kept = order[before < top_p]
        assert token in kept.tolist(), "the sampled token lies outside the nucleus"
        out.append(math.log(probs[token].item() / probs[kept].sum().item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.0, 1.0), (0.0, 1.0)])
def test_sampling_logprobs_equal_a_naive_recompute(sharp_model, char_tokenizer, temperature, top_p):
    # log q(y) of the tempered, renormalised nucleus each token was drawn from; raw at T=1/top-p 1; 0 greedy.
    config = SamplingConfig(
        n=2 if temperature else 1, temperature=temperature, top_p=top_p, max_new_tokens=20, batch_size=8
    )
    prompt_ids, keys = encode(char_tokenizer)
    rollouts = TransformersSampler(sharp_model, char_tokenizer, config, "cpu").sample(
        prompt_ids, keys, seed=3
    )
    worst, gap_to_raw, gap_to_untruncated = 0.0, 0.0, 0.0
    for r in rollouts:
        ours = torch.tensor(r.sampling_logprobs, dtype=torch.float64)
        assert len(r.sampling_logprobs) == len(r.response_ids) >= 1
        if temperature == 0:
            assert ours.abs().max().item() == 0.0
            continue
        naive = naive_sampling_logprobs(sharp_model, r.prompt_ids, r.response_ids, temperature, top_p)
        worst = max(worst, (ours - naive).abs().max().item())
        untruncated = naive_sampling_logprobs(sharp_model, r.prompt_ids, r.response_ids, temperature, 1.0)
        gap_to_untruncated = max(gap_to_untruncated, (ours - untruncated).abs().max().item())
        gap_to_raw = max(gap_to_raw, (ours - torch.tensor(r.behavior_logprobs).double()).abs().max().item())
    print(f"T={temperature} top-p={top_p}: sampling_logprobs vs naive recompute, max |diff| {worst:.2e}")
    assert worst < 1e-4
    if temperature == 1.0 and top_p == 1.0:
        assert gap_to_raw == 0.0  # the same distribution: identical numbers
    elif temperature:
        assert gap_to_raw > 1e-2  # the test can tell the sampling distribution from the raw one
        assert gap_to_untruncated > 1e-2  # ... and the renormalised nucleus from the whole tempered softmax


def test_deterministic_per_seed(sharp_model, char_tokenizer):
    config = SamplingConfig(n=2, temperature=1.0, top_p=0.95, max_new_tokens=10, batch_size=8)
    sampler = TransformersSampler(sharp_model, char_tokenizer, config, "cpu")
    prompt_ids, keys = encode(char_tokenizer)
    first = sampler.sample(prompt_ids, keys, seed=7)
    assert first == sampler.sample(prompt_ids, keys, seed=7)
    assert tokens(first) != tokens(sampler.sample(prompt_ids, keys, seed=8))
    # The sample index and the prompt key enter the seed: two samples of a prompt differ.
    assert first[0].response_ids != first[1].response_ids
    assert sample_seed(7, "p0", 0) == sample_seed(7, "p0", 0) != sample_seed(7, "p0", 1)
    # Without an explicit seed the config's seed is used.
    assert tokens(sampler.sample(prompt_ids, keys)) == tokens(sampler.sample(prompt_ids, keys, seed=0))


def test_sampling_does_not_depend_on_batching(sharp_model, char_tokenizer):
    prompt_ids, keys = encode(char_tokenizer)
    config = SamplingConfig(n=2, temperature=1.0, top_p=0.9, max_new_tokens=12, batch_size=8)
    batched = TransformersSampler(sharp_model, char_tokenizer, config, "cpu").sample(prompt_ids, keys, seed=5)
    alone = TransformersSampler(sharp_model, char_tokenizer, dataclasses.replace(config, batch_size=1), "cpu")
    single = alone.sample(prompt_ids, keys, seed=5)
    assert tokens(batched) == tokens(single)
    # And a prompt's rollouts do not depend on which other prompts are sampled with it.
    assert tokens(alone.sample(prompt_ids[2:3], keys[2:3], seed=5)) == tokens(batched[4:6])


def test_greedy_takes_the_argmax(sharp_model, char_tokenizer):
    config = SamplingConfig(n=1, temperature=0.0, max_new_tokens=10)
    prompt_ids, keys = encode(char_tokenizer)
    sampler = TransformersSampler(sharp_model, char_tokenizer, config, "cpu")
    rollouts = sampler.sample(prompt_ids, keys, seed=0)
    assert tokens(rollouts) == tokens(sampler.sample(prompt_ids, keys, seed=123))  # the seed is irrelevant
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        with torch.no_grad():
            logits = sharp_model(ids).logits[0]
        start = len(r.prompt_ids) - 1
        assert r.response_ids == logits[start : start + len(r.response_ids)].argmax(-1).tolist()


def test_left_padding_matches_one_by_one(sharp_model, char_tokenizer):
    prompt_ids, keys = encode(char_tokenizer, PROMPTS + ["1+2=", "123456+654321="])
    config = SamplingConfig(n=1, temperature=0.0, max_new_tokens=15, batch_size=6)
    batched = TransformersSampler(sharp_model, char_tokenizer, config, "cpu").sample(prompt_ids, keys, seed=0)
    single_sampler = TransformersSampler(
        sharp_model, char_tokenizer, dataclasses.replace(config, batch_size=1), "cpu"
    )
    single = single_sampler.sample(prompt_ids, keys, seed=0)
    assert tokens(batched) == tokens(single)
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.behavior_logprobs, s.behavior_logprobs, atol=1e-5)


def test_horizon_is_capped_by_the_context(sharp_model, char_tokenizer):
    config = SamplingConfig(n=1, temperature=0.0, max_new_tokens=30)
    sampler = TransformersSampler(sharp_model, char_tokenizer, config, "cpu", max_context=20)
    long_prompt = char_tokenizer("1234567+7654321=")["input_ids"]  # 16 tokens: room for 4
    short_prompt = char_tokenizer("1+2=")["input_ids"]  # room for 16
    rollouts = sampler.sample([long_prompt, short_prompt], ["long", "short"], seed=0)
    for r in rollouts:
        room = 20 - len(r.prompt_ids)
        assert len(r.response_ids) <= room
        assert r.finish_reason == "stop" or len(r.response_ids) == room
    with pytest.raises(InputError, match="no room to generate"):
        sampler.sample([long_prompt + [5, 6, 7, 8]], ["full"], seed=0)


def test_prompt_checks(sharp_model, char_tokenizer):
    sampler = TransformersSampler(sharp_model, char_tokenizer, SamplingConfig(max_new_tokens=4), "cpu")
    with pytest.raises(InputError, match="unique"):
        sampler.sample([[5, 6], [7, 8]], ["a", "a"])
    with pytest.raises(InputError, match="empty"):
        sampler.sample([[]], ["a"])
    with pytest.raises(InputError, match="another tokenizer"):
        sampler.sample([[5, 100_000]], ["a"])
    with pytest.raises(InputError, match="keys"):
        sampler.sample([[5, 6]], ["a", "b"])


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.97, 0.01, 0.01, 0.01]])
    kept = nucleus(probs, 0.8) > 0
    # Row 0: 0.5 + 0.25 = 0.75 < 0.8, so 0.15 is needed too; row 1: the top token alone.
    assert kept.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_make_sampler_choices(micro_student_dir, sharp_model, char_tokenizer):
    config = SamplingConfig(backend="transformers", dtype="float32", max_new_tokens=4, temperature=0.0)
    sampler = make_sampler(micro_student_dir, config, device="cpu")
    assert isinstance(sampler, TransformersSampler) and sampler.name == "transformers" and sampler.version
    assert sampler.max_context == 128
    # "auto" with a model object cannot use vLLM (it loads directories), whatever is installed.
    auto = make_sampler(sharp_model, dataclasses.replace(config, backend="auto"), tokenizer=char_tokenizer)
    assert isinstance(auto, TransformersSampler)
    with pytest.raises(ConfigError, match="tokenizer"):
        make_sampler(sharp_model, config)
    if not vllm_available():
        with pytest.raises(ConfigError, match="not installed"):
            make_sampler(micro_student_dir, dataclasses.replace(config, backend="vllm"))
        assert isinstance(
            make_sampler(micro_student_dir, dataclasses.replace(config, backend="auto")), TransformersSampler
        )


def test_vllm_engine_config_validation():
    with pytest.raises(ConfigError, match="got 1.5"):
        VLLMEngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="logprobs_mode"):
        VLLMEngineConfig(extra={"logprobs_mode": "processed_logprobs"})


def test_parse_vllm_prompt_logprobs_layout():
    # vLLM's flat layout: no entry for position 0, then (actual token, top-k...) per position.
    prompt, response, k = [1, 2], [3, 4], 2
    rows = [[2, 9, 2], [3, 3, 7], [4, 8, 4]]  # positions 1..3: actual token first
    flat = SimpleNamespace(
        token_ids=[t for row in rows for t in row],
        logprobs=[-float(t) / 10 for row in rows for t in row],
    )
    scored = _parse_prompt_logprobs(flat, len(prompt), response, k)
    np.testing.assert_allclose(scored.logprobs, [-0.3, -0.4])
    assert scored.topk_ids.tolist() == [[3, 7], [8, 4]] and scored.topk_ids.dtype == np.int32
    assert scored.topk_logprobs.shape == (2, 2) and scored.logprobs.dtype == np.float32
    with pytest.raises(RuntimeError, match="do not belong"):
        _parse_prompt_logprobs(flat, len(prompt), [3, 5], k)
