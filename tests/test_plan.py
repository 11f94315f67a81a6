"""``lopd plan`` pinned against measurements: the activation estimate (one layer measured at two short
lengths, extrapolated) against what whole multi-layer students save at another length, and the
static part (weights, gradients, AdamW moments) against the tensors of a real training step."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_lopd
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

from lightning_opd.plan import GIB, Choice, architecture_shapes, estimate, fit_warning, layer_saved_bytes
from lightning_opd.scale import ScaleFlags, prepare_student
from lightning_opd.stage2.objectives import make_objective
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients, apply_update, make_optimizer
from pipelines.train import TrainConfig

CONFIGS = {
    "qwen3": Qwen3Config(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
    ),
    "gemma3": Gemma3TextConfig(
        vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, sliding_window=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
}  # fmt: skip


def _model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_activation_estimate_matches_whole_students_at_other_lengths(arch, precision):
    config = CONFIGS[arch]
    shapes = architecture_shapes(config, precision)  # one layer, 32 and 64 tokens
    ids = torch.randint(3, 500, (2, 150))  # 300 tokens, three layers
    tokens = ids.numel()
    for checkpointing in (False, True):
        model = _model(config)
        if checkpointing:
            model = prepare_student(model, ScaleFlags(gradient_checkpointing=True)).train()
        measured = layer_saved_bytes(model, ids, precision)
        choice = Choice(lora_rank=0, fsdp2=False, checkpointing=checkpointing, tokens=tokens)
        planned = estimate(shapes, choice, gpus=1)["activations"]
        assert planned == pytest.approx(measured, rel=0.05), (checkpointing, planned, measured)
    assert shapes.ckpt_bytes_per_token < shapes.act_bytes_per_token / 5


def _state_bytes(model, optimizer) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()
    moments = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(t.numel() * t.element_size() for t in moments),
    }


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_static_estimate_is_what_a_training_step_holds(lora_rank):
    """After a real step (one process), the weights, kept gradients and AdamW moments are exactly the
    plan's. (Gradients are not freed here, to measure them: apply_update sets them to None after.)"""
    config = CONFIGS["qwen3"]
    model = prepare_student(_model(config), ScaleFlags(lora_rank=lora_rank))
    flags = TrainConfig(student="s", stores="st", out="o", lora_rank=lora_rank)
    optimizer, scheduler = make_optimizer(model, flags)
    rows = [{"prompt_id": "p", "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [7, 8, 9],
             "teacher_logprobs": [-1.0] * 3, "behavior_logprobs": [-1.5] * 3}]  # fmt: skip
    inputs = UpdateInputs(objective=make_objective("lightning"), horizon=8, pad_id=0, micro_batch_size=1)
    accumulate_gradients(model, rows, inputs, step=1)
    with_grads = _state_bytes(model, optimizer)
    apply_update(None, model, optimizer, scheduler, grad_clip=1.0, step=0)
    measured = {**with_grads, "optimizer": _state_bytes(model, optimizer)["optimizer"]}
    planned = estimate(architecture_shapes(config), Choice(lora_rank, False, False, tokens=8), gpus=1)
    for part, value in measured.items():
        assert planned[part] == value, part


def test_lopd_plan_end_to_end(sft_student_dir, tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", "--model", sft_student_dir, "--sequence-length", 64, "--gpus", 2, "--out", out]
    result = run_lopd(*args, "--gpu-memory-gib", 4)
    assert "cheapest that fits" in result.stdout
    # three micro-batch sizes x (full, LoRA) x (DDP, FSDP2) x (checkpointing off, on) = 24 rows
    plan = json.loads(out.read_text())
    assert len(plan["rows"]) == 24 and plan["rows"][0]["fits"]
    assert "accelerate launch --multi_gpu --num_processes 2" in result.stdout  # a tiny model: DDP wins
    tight = run_lopd(*args, "--gpu-memory-gib", 0.5, "--micro-batch-sizes", "1")
    assert "nothing fits" in tight.stdout  # the 2 GiB allowance for the CUDA context alone


def test_lopd_plan_reads_a_bare_config_json(tmp_path):
    path = tmp_path / "config.json"
    CONFIGS["qwen3"].to_json_file(path)
    result = run_lopd("plan", "--model", path, "--sequence-length", 128, "--micro-batch-sizes", "1")
    assert "3 layers, vocab 512" in result.stdout


def test_lopd_plan_bad_input(tmp_path):
    result = run_lopd("plan", "--model", tmp_path / "nope", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_lopd("plan", "--model", tmp_path, "--micro-batch-sizes", "0", check=False)
    assert result.returncode == 2 and "--micro-batch-sizes" in result.stderr


def test_train_warns_only_where_device_memory_is_known(sft_student_dir):
    flags = TrainConfig(student=str(sft_student_dir), stores="st", out="o")
    assert fit_warning(flags, tokens=1 << 20, gpus=1, device="cpu") is None


@pytest.mark.parametrize("gpus", [1, 8])
def test_the_documented_8b_commands_are_what_the_plan_says_fits(gpus):
    """docs/SCALE.md quotes `lopd plan` for Qwen3-8B at 16k tokens; a change to the plan that moves its
    choice must move the doc too."""
    from pathlib import Path

    from pipelines.plan import PlanConfig
    from pipelines.plan import run as plan

    lines = []
    repo = Path(__file__).resolve().parents[1]
    config = PlanConfig(model=str(repo / "examples/configs/qwen3-8b.json"), sequence_length=16384, gpus=gpus)
    plan(config, log=lines.append)
    best = next(line for line in lines if line.startswith("cheapest that fits"))
    assert best in (repo / "docs" / "SCALE.md").read_text()


def test_lopd_plan_for_the_online_baseline_counts_the_teacher_and_reference(
    sft_student_dir, micro_teacher_dir, tmp_path
):
    args = ["plan", "--model", sft_student_dir, "--sequence-length", 64, "--micro-batch-sizes", "1"]
    run_lopd(*args, "--out", tmp_path / "a.json")
    alone = json.loads((tmp_path / "a.json").read_text())
    online = [*args, "--teacher", micro_teacher_dir, "--reference-copy", "--out", tmp_path / "o.json"]
    result = run_lopd(*online)
    assert "the teacher sits on the same GPU" in result.stdout and "lopd train-online" in result.stdout
    plan = json.loads((tmp_path / "o.json").read_text())
    row, base = plan["rows"][0], alone["rows"][0]
    teacher = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(micro_teacher_dir).parameters())
    # the micro teacher is saved in fp32: 4 B/param; the reference is an fp32 copy of the student
    assert row["parts_gib"]["teacher"] * GIB == pytest.approx(4 * teacher)
    assert row["peak_gib"] == pytest.approx(
        base["peak_gib"] + row["parts_gib"]["teacher"] + row["parts_gib"]["reference_copy"]
    )
    refused = run_lopd(*online, "--gpus", 2, check=False)
    assert refused.returncode == 2 and "runs in one process" in refused.stderr


def test_planned_peak_is_within_15_percent_of_a_measured_cpu_peak(tmp_path):
    """The whole plan against a real process: two stage-two updates of the toy student at 8k tokens per
    micro-batch, peak resident memory measured (benchmarks/bench_plan_peak.py: BENCHMARKS.md has the
    table for three shapes at three lengths)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plan_peak.py"
    out = tmp_path / "peak.json"
    subprocess.run(
        [sys.executable, script, "--shapes", "toy", "--lengths", "8192", "--json", out],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (point,) = json.loads(out.read_text())
    assert 0.85 <= point["planned/measured"] <= 1.15, point
