"""CUDA paths of the numeric core (``make test-gpu``): teacher scoring and the stage-two update step on
a GPU agree with the CPU reference, in fp32 and under bf16 autocast, and stay within their memory
bound at a large vocabulary. Skipped cleanly where there is no CUDA device."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lightning_opd.scoring import score_sequences
from lightning_opd.stage2.objectives import make_objective
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 to fp32, not to TF32
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _model(vocab: int = 4096, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


def _sequences(vocab: int, n: int = 6, seed: int = 1, prompt_len=(3, 12), response_len=(1, 20)):
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(n):
        p = int(torch.randint(*prompt_len, (1,), generator=g))
        r = int(torch.randint(*response_len, (1,), generator=g))
        prompts.append(torch.randint(1, vocab, (p,), generator=g).tolist())
        responses.append(torch.randint(1, vocab, (r,), generator=g).tolist())
    return prompts, responses


def _naive_logprobs(model, prompt, response) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p = len(prompt)
    return logp[torch.arange(p - 1, p - 1 + len(response)), torch.tensor(response)]


def test_scoring_on_cuda_matches_the_naive_cpu_reference():
    model = _model()
    prompts, responses = _sequences(4096)
    gpu = copy.deepcopy(model).cuda()
    scored = score_sequences(gpu, prompts, responses, topk=5, chunk_size=7, max_tokens_per_batch=64)
    for prompt, response, s in zip(prompts, responses, scored):
        naive = _naive_logprobs(model, prompt, response)
        assert torch.allclose(torch.as_tensor(s.logprobs), naive, atol=1e-4)
        assert s.topk_ids.shape == (len(response), 5)


def test_scoring_on_cuda_in_bf16_stays_close_to_fp32():
    model = _model()
    prompts, responses = _sequences(4096)
    bf16 = copy.deepcopy(model).cuda().to(torch.bfloat16)
    scored = score_sequences(bf16, prompts, responses, chunk_size=16)
    for prompt, response, s in zip(prompts, responses, scored):
        assert torch.allclose(torch.as_tensor(s.logprobs), _naive_logprobs(model, prompt, response), atol=0.1)


def test_scoring_on_cuda_never_holds_full_vocabulary_logits():
    vocab, n, length = 131072, 8, 512
    model = _model(vocab).cuda().to(torch.bfloat16)
    prompts, responses = _sequences(vocab, n=n, prompt_len=(4, 5), response_len=(length, length + 1))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    score_sequences(model, prompts, responses, topk=8, chunk_size=256, max_tokens_per_batch=n * (length + 8))
    peak = torch.cuda.max_memory_allocated() - base
    naive = n * length * vocab * 4  # the [B, S, V] fp32 logits a naive scorer would hold
    assert peak < naive / 8, (
        f"scoring peaked at {peak / 2**20:.0f} MiB (naive logits: {naive / 2**20:.0f} MiB)"
    )


def _rows(model, vocab: int, n: int = 6):
    """Store-shaped rows whose behaviour log-probs are the model's own (a freshly sampled store)."""
    prompts, responses = _sequences(vocab, n=n)
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        own = _naive_logprobs(model, p, r).tolist()
        teacher = [x + (0.5 if t % 2 else -0.5) for t, x in enumerate(own)]
        rows.append(
            {
                "prompt_id": f"p{i}",
                "sample_index": 0,
                "prompt_ids": p,
                "response_ids": r,
                "behavior_logprobs": own,
                "teacher_logprobs": teacher,
            }
        )
    return rows


def _gradient(model, rows, autocast_dtype=None) -> torch.Tensor:
    inputs = UpdateInputs(
        make_objective("lightning", clip_eps=0.2), horizon=32, pad_id=0, micro_batch_size=4, chunk_size=5
    )
    model.zero_grad()
    device = next(model.parameters()).device
    ctx = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        accumulate_gradients(model, rows, inputs, step=1)
    return torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])


def test_stage_two_step_on_cuda_matches_cpu():
    model = _model().train()
    rows = _rows(model, 4096)
    cpu = _gradient(model, rows)
    gpu = _gradient(copy.deepcopy(model).cuda(), rows)
    assert cpu.abs().max() > 0
    assert torch.allclose(gpu, cpu, atol=1e-5, rtol=1e-3)


def test_stage_two_step_under_bf16_autocast_on_cuda_follows_fp32():
    model = _model().train()
    rows = _rows(model, 4096)
    cpu = _gradient(model, rows)
    bf16 = _gradient(copy.deepcopy(model).cuda(), rows, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(bf16).all()
    assert torch.nn.functional.cosine_similarity(bf16, cpu, dim=0) > 0.98


def test_stage_two_step_on_cuda_never_holds_full_vocabulary_logits():
    vocab, n, length = 131072, 8, 512
    model = _model(vocab).cuda().train()
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt_id": f"p{i}",
            "sample_index": 0,
            "prompt_ids": torch.randint(1, vocab, (4,), generator=g).tolist(),
            "response_ids": torch.randint(1, vocab, (length,), generator=g).tolist(),
            "behavior_logprobs": [-11.0] * length,
            "teacher_logprobs": [-10.0] * length,
        }
        for i in range(n)
    ]
    inputs = UpdateInputs(
        make_objective("lightning"), horizon=length, pad_id=0, micro_batch_size=n, chunk_size=256
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        accumulate_gradients(model, rows, inputs, step=1)
    peak = torch.cuda.max_memory_allocated() - base
    naive = n * length * vocab * 4
    assert peak < naive / 4, (
        f"the update step peaked at {peak / 2**20:.0f} MiB (naive logits: {naive / 2**20:.0f} MiB)"
    )


def test_vllm_sampling_on_cuda_matches_a_transformers_rescore(tmp_path):
    """vLLM on the GPU (when installed): rollouts come back well-formed and their raw behaviour
    log-probs agree with an fp32 transformers rescore up to bf16 rounding."""
    pytest.importorskip("vllm")
    from lightning_opd.stage1.rollout import SamplingConfig
    from lightning_opd.stage1.vllm_backend import VLLMEngineConfig, VLLMSampler
    from lightning_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)  # peaked distributions: a wrong position shows
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [tokenizer(p)["input_ids"] for p in ("12+34=", "5+6=", "999+1=")]
    sampling = SamplingConfig(n=2, temperature=0.8, top_p=0.95, max_new_tokens=32, seed=1, dtype="bfloat16")
    engine = VLLMEngineConfig(max_model_len=128, gpu_memory_utilization=0.2, enforce_eager=True)
    with VLLMSampler(tmp_path, sampling, engine=engine) as sampler:
        rollouts = sampler.sample(prompts, ["a", "b", "c"], seed=1)
    assert len(rollouts) == 6
    diffs = []
    for r in rollouts:
        assert 1 <= len(r.response_ids) <= 32 and r.finish_reason in ("stop", "length")
        assert len(r.behavior_logprobs) == len(r.response_ids)
        naive = _naive_logprobs(model.eval(), r.prompt_ids, r.response_ids)
        diffs.append((torch.tensor(r.behavior_logprobs) - naive).abs().max().item())
    # bf16 weights and activations vs fp32: ~1e-2; an off-by-one position or tempered log-probs: ~1.
    assert max(diffs) < 0.15, f"vLLM vs transformers behaviour log-probs: max |diff| {max(diffs):.3g}"


def test_bf16_checkpointing_and_lora_on_cuda_follow_the_fp32_gradient():
    """The one-GPU 8B recipe's step (bf16 autocast over fp32 weights, checkpointed layers, LoRA) on CUDA
    gives the adapters the gradient a plain fp32 CPU step gives them."""
    from lightning_opd.scale import ScaleFlags, prepare_student

    base = _model().train()
    rows = _rows(base, 4096)
    lora = prepare_student(copy.deepcopy(base), ScaleFlags(lora_rank=4))
    for p in lora.parameters():  # a non-zero B, so every adapter gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    cpu = _gradient(lora, rows)
    checkpointing = ScaleFlags(gradient_checkpointing=True)  # on top of the adapters already there
    gpu = prepare_student(copy.deepcopy(lora), checkpointing).cuda().train()
    bf16 = _gradient(gpu, rows, autocast_dtype=torch.bfloat16)
    assert bf16.shape == cpu.shape and torch.isfinite(bf16).all()
    assert torch.nn.functional.cosine_similarity(bf16, cpu, dim=0) > 0.98


def test_fp16_overflow_on_cuda_is_skipped_by_the_loss_scaler():
    """With accelerate's real GradScaler: an injected inf gradient skips the step, lowers the scale and
    the next step trains."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lightning_opd.stage2.step import apply_update, make_optimizer
    from pipelines.train import TrainConfig

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="fp16")
    model = _model().cuda().train()
    rows = _rows(model, 4096)
    optimizer, scheduler = make_optimizer(model, TrainConfig(student="s", stores="st", out="o", lr=1e-3))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    inputs = UpdateInputs(make_objective("lightning"), horizon=32, pad_id=0, micro_batch_size=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = accelerator.scaler.get_scale()
    accumulate_gradients(model, rows, inputs, step=1, accelerator=accelerator)
    next(model.parameters()).grad[0, 0] = float("inf")
    update = apply_update(accelerator, model, optimizer, scheduler, grad_clip=1.0, step=0)
    assert update["skipped_step"] == 1 and accelerator.scaler.get_scale() < scale
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    accumulate_gradients(model, rows, inputs, step=2, accelerator=accelerator)
    update = apply_update(accelerator, model, optimizer, scheduler, grad_clip=1.0, step=1)
    assert update["skipped_step"] == 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    AcceleratorState._reset_state(reset_partial_state=True)
