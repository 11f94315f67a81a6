"""Chunked log-prob kernels and sequence scoring, pinned against naive full log-softmax references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from lightning_opd.errors import ConfigError, InputError
from lightning_opd.logprobs import (
    LogitPostprocess,
    final_hidden_states,
    logit_postprocess,
    logprobs_at_ids_from_hidden,
    output_head,
    positions_per_chunk,
    token_logprobs_from_hidden,
    topk_logprobs_from_hidden,
)
from lightning_opd.scoring import bare_forward, plan_batches, score_sequences

V, H = 37, 8


def _naive_logprobs(hidden, weight, bias=None, post=None):
    logits = F.linear(hidden, weight, bias).float()
    if post is not None:
        logits = post(logits)
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (3, 11), generator=g)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])  # 33 positions: most do not divide it
def test_token_logprobs_match_naive(tensors, chunk_size):
    hidden, weight, bias, targets = tensors
    ours = token_logprobs_from_hidden(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    ref = _naive_logprobs(hidden, weight, bias).gather(-1, targets[..., None])[..., 0]
    assert ours.dtype == torch.float32 and ours.shape == (3, 11)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_postprocess_is_applied_like_the_model(tensors):
    hidden, weight, _, targets = tensors
    post = LogitPostprocess(scale=0.5, softcap=3.0)
    ours = token_logprobs_from_hidden(hidden * 4, weight, targets, chunk_size=5, postprocess=post)
    ref = _naive_logprobs(hidden * 4, weight, post=lambda z: torch.tanh(z * 0.5 / 3.0) * 3.0)
    torch.testing.assert_close(ours, ref.gather(-1, targets[..., None])[..., 0], rtol=0, atol=1e-5)


def test_negative_targets_give_zero(tensors):
    hidden, weight, _, targets = tensors
    targets = targets.clone()
    targets[0, :4] = -100
    ours = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=4)
    assert torch.all(ours[0, :4] == 0)
    assert torch.all(ours[0, 4:] < 0)


def test_bf16_logits_are_upcast_before_logsumexp(tensors):
    hidden, weight, _, targets = tensors
    hidden, weight = (hidden * 3).bfloat16(), weight.bfloat16()
    ours = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=5)
    ref = _naive_logprobs(hidden, weight).gather(-1, targets[..., None])[..., 0]
    assert ours.dtype == torch.float32
    # A bf16 logsumexp would be off by ~1e-2 here; upcasting the chunk keeps us at fp32 rounding.
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    bf16_lse = torch.log_softmax(F.linear(hidden, weight), -1).gather(-1, targets[..., None])[..., 0].float()
    assert (bf16_lse - ref).abs().max() > 1e-3  # the check above can tell the two apart


@pytest.mark.parametrize("chunk_size", [2, 1000])
def test_topk_and_logprobs_at_ids_match_naive(tensors, chunk_size):
    hidden, weight, bias, _ = tensors
    ids, lps = topk_logprobs_from_hidden(hidden, weight, 5, bias=bias, chunk_size=chunk_size)
    ref_lps, ref_ids = _naive_logprobs(hidden, weight, bias).topk(5, dim=-1)
    assert ids.dtype == torch.int32 and lps.dtype == torch.float32 and ids.shape == (3, 11, 5)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(lps, ref_lps, rtol=0, atol=1e-5)

    at = logprobs_at_ids_from_hidden(hidden, weight, ids, bias=bias, chunk_size=chunk_size)
    torch.testing.assert_close(at, ref_lps, rtol=0, atol=1e-5)
    shuffled = ids.flip(-1).long()
    at = logprobs_at_ids_from_hidden(hidden, weight, shuffled, bias=bias, chunk_size=3)
    torch.testing.assert_close(
        at, _naive_logprobs(hidden, weight, bias).gather(-1, shuffled), rtol=0, atol=1e-5
    )


def _leaves(tensors):
    hidden, weight, bias, targets = tensors
    return [t.clone().requires_grad_(True) for t in (hidden, weight, bias)], targets


@pytest.mark.parametrize("kernel", ["token", "ids"])
def test_checkpointed_gradient_equals_naive_gradient(tensors, kernel):
    (h1, w1, b1), targets = _leaves(tensors)
    (h2, w2, b2), _ = _leaves(tensors)
    upstream = torch.randn(
        3, 11, *(() if kernel == "token" else (4,)), generator=torch.Generator().manual_seed(1)
    )
    ids = torch.randint(0, V, (3, 11, 4), generator=torch.Generator().manual_seed(2))
    if kernel == "token":
        ours = token_logprobs_from_hidden(h1, w1, targets, bias=b1, chunk_size=4, checkpoint=True)
        ref = _naive_logprobs(h2, w2, b2).gather(-1, targets[..., None])[..., 0]
    else:
        ours = logprobs_at_ids_from_hidden(h1, w1, ids, bias=b1, chunk_size=4, checkpoint=True)
        ref = _naive_logprobs(h2, w2, b2).gather(-1, ids)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def _saved_numels(fn):
    """Sizes of the tensors autograd keeps for backward while ``fn`` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_checkpoint_keeps_no_logits_for_backward(tensors):
    (h, w, b), targets = _leaves(tensors)
    n_positions = 33
    plain = _saved_numels(lambda: token_logprobs_from_hidden(h, w, targets, bias=b, chunk_size=4))
    ckpt = _saved_numels(
        lambda: token_logprobs_from_hidden(h, w, targets, bias=b, chunk_size=4, checkpoint=True)
    )
    assert sum(plain) >= n_positions * V  # every chunk's logits are held without checkpointing
    assert sum(ckpt) < n_positions * V / 2  # with it, autograd holds no [chunk, V] tensor


def test_positions_per_chunk_caps_the_logits_of_a_chunk():
    assert positions_per_chunk(1024, 32768) == 1024  # the default cap is 1024 positions at 32k
    assert positions_per_chunk(1024, 262144) == 128  # 8x the vocabulary, 1/8 the positions
    assert positions_per_chunk(7, 100, max_chunk_logits=10_000) == 7  # chunk_size stays a maximum
    assert positions_per_chunk(1024, 10**9) == 1  # never zero positions
    with pytest.raises(ConfigError, match="chunk_size"):
        positions_per_chunk(0, 100)


def test_capped_chunks_hold_at_most_the_cap_and_match_naive(tensors):
    (h1, w1, b1), targets = _leaves(tensors)
    (h2, w2, b2), _ = _leaves(tensors)
    cap = 3 * V  # 3 positions per chunk although chunk_size asks for 1000
    sizes = _saved_numels(
        lambda: token_logprobs_from_hidden(h1, w1, targets, bias=b1, chunk_size=1000, max_chunk_logits=cap)
    )
    # Besides the weight, the largest tensor autograd keeps is one capped chunk's logits (not 33 x V).
    assert max(n for n in sizes if n != V * H) == cap
    ours = token_logprobs_from_hidden(
        h1, w1, targets, bias=b1, chunk_size=1000, checkpoint=True, max_chunk_logits=cap
    )
    ref = _naive_logprobs(h2, w2, b2).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    hidden, weight, bias, _ = tensors
    ids, lps = topk_logprobs_from_hidden(hidden, weight, 4, bias=bias, chunk_size=1000, max_chunk_logits=cap)
    ref_lps, ref_ids = _naive_logprobs(hidden, weight, bias).topk(4, dim=-1)
    assert torch.equal(ids.long(), ref_ids)
    at = logprobs_at_ids_from_hidden(hidden, weight, ids, bias=bias, chunk_size=1000, max_chunk_logits=cap)
    torch.testing.assert_close(at, ref_lps, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Whole models


@pytest.fixture(scope="module")
def micro(micro_teacher_dir):
    return AutoModelForCausalLM.from_pretrained(micro_teacher_dir, dtype=torch.float32).eval()


def _naive_scores(model, prompt, response, k=0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    sampled = rows.gather(-1, torch.tensor(response)[:, None])[:, 0]
    return sampled.numpy(), (rows.topk(k, dim=-1) if k else None)


def test_final_hidden_states_feed_the_lm_head(micro):
    ids = torch.tensor([[5, 9, 13, 21, 8, 40]])
    weight, bias = output_head(micro)
    with torch.no_grad():
        ours = F.linear(final_hidden_states(micro, ids, torch.ones_like(ids)), weight, bias)
        torch.testing.assert_close(ours, micro(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert logit_postprocess(micro).is_identity


def test_score_sequences_matches_naive_per_sequence(micro):
    rng = np.random.default_rng(0)
    lengths = [(1, 6), (7, 3), (2, 11), (5, 0), (3, 1), (9, 14), (4, 5)]
    prompts = [rng.integers(4, 90, p).tolist() for p, _ in lengths]
    responses = [rng.integers(4, 90, r).tolist() for _, r in lengths]
    calls = []
    # A 30-token budget forces several batches, each right-padded to different widths.
    scored = score_sequences(
        micro, prompts, responses, topk=3, max_tokens_per_batch=30, chunk_size=5, progress=calls.append
    )
    assert sum(calls) == len(prompts) - 1 and len(calls) > 2  # the empty response needs no batch
    for prompt, response, s in zip(prompts, responses, scored):
        assert s.logprobs.dtype == np.float32 and s.logprobs.shape == (len(response),)
        assert s.topk_ids.dtype == np.int32 and s.topk_ids.shape == (len(response), 3)
        if not response:
            continue
        sampled, (top_lps, top_ids) = _naive_scores(micro, prompt, response, k=3)
        np.testing.assert_allclose(s.logprobs, sampled, atol=1e-5, rtol=0)  # includes t = 0
        np.testing.assert_array_equal(s.topk_ids, top_ids.numpy())
        np.testing.assert_allclose(s.topk_logprobs, top_lps.numpy(), atol=1e-5, rtol=0)


def test_score_sequences_first_position_uses_the_last_prompt_state(micro):
    # Same response after two prompts that differ only in their last token: t = 0 must differ.
    a, b = score_sequences(micro, [[5, 6, 7], [5, 6, 8]], [[9, 10], [9, 10]])
    assert a.logprobs[0] != b.logprobs[0]


def test_score_sequences_in_bf16_is_close_to_naive(micro):
    model = AutoModelForCausalLM.from_config(micro.config).eval()
    model.load_state_dict(micro.state_dict())
    model = model.to(torch.bfloat16)
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]]
    for s, prompt, response in zip(score_sequences(model, prompts, responses), prompts, responses):
        np.testing.assert_allclose(s.logprobs, _naive_scores(model, prompt, response)[0], atol=2e-2)


def test_score_sequences_rejects_bad_inputs(micro):
    with pytest.raises(InputError, match="empty prompt"):
        score_sequences(micro, [[5], []], [[6], [7]])
    with pytest.raises(InputError, match="outside"):
        score_sequences(micro, [[5]], [[10_000]])
    with pytest.raises(InputError, match="responses"):
        score_sequences(micro, [[5]], [])
    empty = score_sequences(micro, [[5]], [[]], topk=2)[0]
    assert empty.logprobs.shape == (0,) and empty.topk_ids.shape == (0, 2)


def test_unreplicated_logit_postprocessing_is_refused(micro):
    model = AutoModelForCausalLM.from_config(micro.config).eval()
    model.config.logit_scale = 2.0  # we would scale, the Qwen2 forward does not: must be caught
    with pytest.raises(InputError, match="post-processed"):
        score_sequences(model, [[5, 6]], [[7, 8]])


@pytest.mark.parametrize("arch", ["gemma2_softcap", "granite_scaling"])
def test_known_logit_postprocessing_is_replicated(arch):
    common = dict(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    if arch == "gemma2_softcap":
        common.update(num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5)
        model = Gemma2ForCausalLM(Gemma2Config(**common)).eval()
    else:
        model = GraniteForCausalLM(GraniteConfig(**common, num_key_value_heads=2, logits_scaling=0.25)).eval()
    assert not logit_postprocess(model).is_identity
    prompts, responses = [[1, 2, 3], [4]], [[5, 6, 7, 8], [9, 10]]
    for s, prompt, response in zip(
        score_sequences(model, prompts, responses, chunk_size=3), prompts, responses
    ):
        np.testing.assert_allclose(s.logprobs, _naive_scores(model, prompt, response)[0], atol=1e-5)


def test_plan_batches_respects_budget_and_covers_everything():
    lengths = [5, 40, 3, 12, 12, 7, 100, 1]
    batches = plan_batches(lengths, 24)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [6] and batches[1] == [1]  # longest first; oversize ones alone
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 24


def test_bare_forward_runs_the_same_batches(micro):
    assert bare_forward(micro, [[5, 6], [7]], [[8, 9, 10], []], max_tokens_per_batch=4) == 3
