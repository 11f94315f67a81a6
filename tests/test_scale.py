"""Stage two at scale (issue 19): gradient checkpointing, LoRA through peft, fp32 head logits under
autocast, fp16's skipped overflow steps, the saved model's dtype. The same core serves stage zero,
offline and online training; the end-to-end tests go through the real ``lopd`` command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import run_lopd
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from lightning_opd.errors import ConfigError
from lightning_opd.logprobs import final_hidden_states, token_logprobs_from_hidden
from lightning_opd.scale import ScaleFlags, merged_lora_state, prepare_student
from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.stage2.objectives import make_objective
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients, apply_update, make_optimizer
from lightning_opd.toy.models import STUDENT_SPEC, build_model
from pipelines.train import TrainConfig

ROWS = [
    {"prompt_id": "p", "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [7, 8, 9]},
    {"prompt_id": "q", "sample_index": 0, "prompt_ids": [5, 7, 9], "response_ids": [6, 6]},
    {"prompt_id": "r", "sample_index": 1, "prompt_ids": [8], "response_ids": [9, 5, 7, 6, 10, 11]},
]


def _rows(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in ROWS:
        n = len(r["response_ids"])
        teacher, behavior = (-torch.rand(2, n, generator=g) * 3).tolist()
        out.append({**r, "teacher_logprobs": teacher, "behavior_logprobs": behavior})
    return out


def _gemma3(tokenizer) -> Gemma3ForCausalLM:
    """Gemma-3-270M's architecture at a small width: sliding and global layers, q/k norms, softcap-free
    logits, tied embeddings, the sqrt(hidden) embedding scale."""
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config)


def _models(char_tokenizer):
    return {"toy": build_model(STUDENT_SPEC, char_tokenizer, seed=0), "gemma3": _gemma3(char_tokenizer)}


def _gradient(model, rows, objective="lightning", accelerator=None):
    model.train()
    inputs = UpdateInputs(objective=make_objective(objective), horizon=16, pad_id=0, micro_batch_size=2)
    stats = accumulate_gradients(model, rows, inputs, step=1, accelerator=accelerator)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, stats


@pytest.mark.parametrize("arch", ["toy", "gemma3"])
def test_gradient_checkpointing_gives_identical_gradients(char_tokenizer, arch):
    model = _models(char_tokenizer)[arch]
    plain, stats = _gradient(copy.deepcopy(model), _rows())
    checkpointed_model = prepare_student(copy.deepcopy(model), ScaleFlags(gradient_checkpointing=True))
    assert all(layer.gradient_checkpointing for layer in checkpointed_model.model.layers)
    checkpointed, stats_ckpt = _gradient(checkpointed_model, _rows())
    assert plain.keys() == checkpointed.keys() and len(plain) > 5
    for name, grad in plain.items():
        assert grad.abs().max() > 0 or "bias" in name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)
    assert stats_ckpt["loss"] == pytest.approx(stats["loss"], abs=1e-7)


def _saved_activation_elements(model, rows) -> int:
    """Elements autograd saves for backward in one forward of the decoder."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t

    batch = collate(rows, 16, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        final_hidden_states(model, batch.input_ids, batch.attention_mask)
    return saved[0]


def test_gradient_checkpointing_drops_the_saved_activations(char_tokenizer):
    """It is really on (equal gradients alone would also pass with it off): a checkpointed forward saves
    only each layer's input, a small fraction of what the plain forward keeps for backward."""
    plain = _models(char_tokenizer)["gemma3"].train()
    checkpointed = prepare_student(copy.deepcopy(plain), ScaleFlags(gradient_checkpointing=True)).train()
    full, kept = _saved_activation_elements(plain, _rows()), _saved_activation_elements(checkpointed, _rows())
    assert kept < full / 5, (kept, full)


LORA = ScaleFlags(lora_rank=4, lora_alpha=8)


def test_zero_initialised_lora_reproduces_the_base_model(char_tokenizer):
    base = _models(char_tokenizer)["gemma3"].eval()
    batch = collate(_rows(), 16, 0)
    with torch.no_grad():
        want = student_token_batch(base, batch, needs_topk=False, chunk_size=8).student_logprobs
        adapted = prepare_student(copy.deepcopy(base), LORA).eval()
        got = student_token_batch(adapted, batch, needs_topk=False, chunk_size=8).student_logprobs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_lora_trains_only_the_adapters_and_merges_to_the_adapted_model(char_tokenizer):
    base = _models(char_tokenizer)["gemma3"]
    model = prepare_student(copy.deepcopy(base), LORA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = TrainConfig(student="s", stores="st", out="o", lr=1e-2, lora_rank=4)
    optimizer, scheduler = make_optimizer(model, flags)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".mlp." in n for n in trainable) and any("self_attn" in n for n in trainable)  # all-linear
    for _ in range(2):
        _gradient(model, _rows())
        apply_update(None, model, optimizer, scheduler, grad_clip=1.0, step=0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter really moved

    merged = copy.deepcopy(base)
    missing = merged.load_state_dict(merged_lora_state(model.state_dict(), LORA.lora_scaling), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    batch = collate(_rows(), 16, 0)
    with torch.no_grad():
        want = student_token_batch(model.eval(), batch, needs_topk=False, chunk_size=8).student_logprobs
        got = student_token_batch(merged.eval(), batch, needs_topk=False, chunk_size=8).student_logprobs
    assert not torch.allclose(
        want,
        student_token_batch(base.eval(), batch, needs_topk=False, chunk_size=8).student_logprobs.detach(),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lora_flags_are_checked():
    with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
        TrainConfig(student="s", stores="st", out="o", lora_rank=-1)
    with pytest.raises(ConfigError, match="optim must be one of"):
        TrainConfig(student="s", stores="st", out="o", optim="sgd")
    with pytest.raises(ConfigError, match="--lora-target-modules nope"):
        prepare_student(
            build_model(STUDENT_SPEC, _tok(), 0), ScaleFlags(lora_rank=2, lora_target_modules="nope")
        )


def _tok():
    from lightning_opd.toy.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def test_head_logits_are_fp32_under_bf16_autocast():
    """With fp32 master weights the head's matmul leaves autocast: the log-probs are the fp32 ones,
    where a bf16 head rounds each logit before the log-softmax (here ~1e-2 nats off)."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden = 4096, 64
    weight = torch.randn(vocab, hidden, generator=g) * 0.5
    h = torch.randn(32, hidden, generator=g) * 4
    targets = torch.randint(0, vocab, (32,), generator=g)
    want = torch.log_softmax(h.double() @ weight.double().T, -1).gather(-1, targets[:, None])[:, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs_from_hidden(h, weight, targets, chunk_size=8)
        rounded = token_logprobs_from_hidden(h.bfloat16(), weight.bfloat16(), targets, chunk_size=8)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-4
    assert (rounded.double() - want).abs().max() > 1e-2  # what the fp32 head avoids


def test_fp16_overflow_skips_the_step_and_goes_on(char_tokenizer):
    model = build_model(STUDENT_SPEC, char_tokenizer, seed=0)
    flags = TrainConfig(student="s", stores="st", out="o", lr=1e-2, mixed_precision="fp16")
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process-wide precision
    # On CPU accelerate runs fp16 autocast with no loss scaler: the skip must not need one. (On CUDA the
    # scaler's own skip is torch's; the GPU check exercises it.)
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    optimizer, scheduler = make_optimizer(model, flags)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _gradient(model, _rows(), accelerator=accelerator)
    next(model.parameters()).grad[0, 0] = float("inf")  # an injected overflow
    update = apply_update(accelerator, model, optimizer, scheduler, grad_clip=1.0, step=0)
    assert update["skipped_step"] == 1 and update["grad_norm"] is None
    json.dumps(update, allow_nan=False)  # a skipped step still logs as strict JSON
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    _gradient(model, _rows(), accelerator=accelerator)
    update = apply_update(accelerator, model, optimizer, scheduler, grad_clip=1.0, step=1)
    assert update["skipped_step"] == 0 and update["grad_norm"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    AcceleratorState._reset_state(reset_partial_state=True)


def test_non_finite_gradient_still_stops_an_fp32_run(char_tokenizer):
    from lightning_opd.errors import TrainingError

    model = build_model(STUDENT_SPEC, char_tokenizer, seed=0)
    optimizer, scheduler = make_optimizer(model, TrainConfig(student="s", stores="st", out="o"))
    _gradient(model, _rows())
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite gradient norm at step 1"):
        apply_update(None, model, optimizer, scheduler, grad_clip=1.0, step=0)


# ----------------------------------------------------------------------------------------------
# Through the command line


def _train(student, store, out, *extra):
    args = ["train", "--student", student, "--stores", store, "--out", out, "--steps", 3, "--batch-size", 4]
    return run_lopd(*args, "--micro-batch-size", 2, "--lr", "1e-2", "--save-every", 2, *extra)


def test_lora_training_end_to_end_saves_merged_model_and_adapter_and_resumes(
    sft_student_dir, micro_store, tmp_path
):
    from peft import PeftModel

    lora = ["--lora-rank", 4, "--gradient-checkpointing"]
    full = tmp_path / "full"
    _train(sft_student_dir, micro_store, full, *lora)
    final = full / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    saved = load_file(final / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    base = AutoModelForCausalLM.from_pretrained(sft_student_dir)
    adapted = PeftModel.from_pretrained(copy.deepcopy(base), final / "adapter")
    batch = collate(_rows(), 16, 0)
    with torch.no_grad():
        want = student_token_batch(adapted.eval(), batch, needs_topk=False, chunk_size=8).student_logprobs
        got = student_token_batch(merged.eval(), batch, needs_topk=False, chunk_size=8).student_logprobs
        untrained = student_token_batch(base.eval(), batch, needs_topk=False, chunk_size=8).student_logprobs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, untrained, atol=1e-4)
    # Only adapted linears differ from the SFT student (embeddings and norms are frozen).
    start = load_file(sft_student_dir / "model.safetensors")
    assert torch.equal(saved["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )

    # Resume: the same command again restarts from checkpoints/step-2 and must redo step 3 exactly.
    result = _train(sft_student_dir, micro_store, full, *lora)
    assert "resumed from" in result.stdout and "step-2" in result.stdout
    again = load_file(final / "model.safetensors")
    for name, tensor in saved.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6, msg=name)
    config = json.loads((full / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["gradient_checkpointing"] is True


def test_save_dtype_bfloat16(sft_student_dir, micro_store, tmp_path):
    _train(sft_student_dir, micro_store, tmp_path / "bf16", "--steps", 1, "--save-dtype", "bfloat16")
    saved = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    final = tmp_path / "bf16" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"  # what vLLM reads
    assert AutoModelForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16
    # auto: the student's own dtype (the micro student is fp32)
    _train(sft_student_dir, micro_store, tmp_path / "auto", "--steps", 1)
    assert {v.dtype for v in load_file(tmp_path / "auto" / "final" / "model.safetensors").values()} == {
        torch.float32
    }


def test_sft_with_lora_and_checkpointing_saves_merged_model_and_adapter(
    micro_teacher_dir, micro_student_dir, tmp_path
):
    from lightning_opd.prompts import write_jsonl
    from lightning_opd.toy.task import sample_problems, to_records

    prompts = tmp_path / "sft.jsonl"
    write_jsonl(to_records(sample_problems("sft", 8, digits=(1, 2)), with_solution=True), prompts)
    out = tmp_path / "sft"
    run_lopd(
        "sft", "--teacher", micro_teacher_dir, "--student", micro_student_dir, "--prompts", prompts,
        "--out", out, "--steps", 2, "--batch-size", 4, "--max-new-tokens", 8, "--warmup-steps", 1,
        "--temperature", 1.0, "--keep-truncated",
        "--backend", "transformers", "--lr", "1e-2", "--lora-rank", 4, "--gradient-checkpointing",
    )  # fmt: skip
    assert (out / "adapter" / "adapter_config.json").exists()
    saved, start = load_file(out / "model.safetensors"), load_file(micro_student_dir / "model.safetensors")
    assert saved.keys() == start.keys()  # a plain checkpoint: the next stage loads it as any student
    assert torch.equal(saved["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert not torch.equal(
        saved["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"]
    )


def test_train_online_with_lora_and_checkpointing(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path):
    out = tmp_path / "online"
    run_lopd(
        "train-online", "--student", sft_student_dir, "--teacher", micro_teacher_dir, "--prompts", opd_prompts,
        "--out", out, "--steps", 2, "--prompts-per-step", 2, "--n", 2, "--max-new-tokens", 6, "--lr", "1e-2",
        "--micro-batch-size", 4, "--ref-kl-coef", 0.01, "--lora-rank", 4, "--gradient-checkpointing",
    )  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # π_ref is the student before its adapters
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    saved = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in k for k in saved)


def test_stage_two_log_probs_apply_the_models_logit_softcap(char_tokenizer):
    """Gemma 2/3's final logit softcap: stage two's chunked head gives the log-probs of the model's own
    forward, as stage zero and teacher scoring do (issue 22: it used to skip the softcap)."""
    model = _gemma3(char_tokenizer).eval()
    model.config.final_logit_softcapping = 2.0  # small, so that capping changes every log-prob
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits well past the cap (tied: the embedding grows too)
    batch = collate(_rows(), 16, 0)
    with torch.no_grad():
        got = student_token_batch(model, batch, needs_topk=False, chunk_size=4).student_logprobs
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        naive = torch.log_softmax(logits.double(), -1).gather(-1, batch.targets[..., None])[..., 0]
        uncapped_model = copy.deepcopy(model)
        uncapped_model.config.final_logit_softcapping = None
        uncapped = student_token_batch(uncapped_model, batch, needs_topk=False, chunk_size=4).student_logprobs
    where = batch.mask > 0
    torch.testing.assert_close(got[where].double(), naive[where], rtol=0, atol=1e-5)
    assert (uncapped[where] - got[where]).abs().max() > 1e-2  # the cap matters here
