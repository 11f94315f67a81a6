"""Stage two under ``accelerate launch`` with two processes on CPU (gloo): DDP and FSDP2.

The two-process run must be the one-process run on the same global batch: same per-step loss,
gradient norm and drift metrics, same final weights, and a resume from its checkpoint that redoes the
last step exactly. A silent failure of DDP's gradient all-reduce shows up as diverging steps 2-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from lightning_opd.errors import ConfigError
from lightning_opd.stage2.sharding import check_distributed

REPO = Path(__file__).resolve().parents[1]


def _train_args(student, store, prompts, out, micro_batch_size):
    # StableOPD's gold mixture too: it runs a second forward through the DDP wrapper each micro-batch.
    return [
        "train",
        "--student", student,
        "--stores", store,
        "--out", out,
        "--steps", 3,
        "--batch-size", 4,
        "--micro-batch-size", micro_batch_size,
        "--lr", "1e-3",
        "--save-every", 2,
        "--gold-nll-coef", "0.1",
        "--gold-prompts", prompts,
    ]  # fmt: skip


def _run(command: list, check: bool = True, **env) -> subprocess.CompletedProcess:
    # The subprocesses import this checkout; one thread each, as two processes share the CPU.
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=environ, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{command[:6]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _launch_two(args: list, check: bool = True) -> subprocess.CompletedProcess:
    """README's multi-GPU command with two processes; ACCELERATE_USE_CPU=1 makes it DDP over gloo."""
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    flags = ["--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no"]
    flags += ["--dynamo_backend", "no", "--main_process_port", 29500 + os.getpid() % 1000]
    return _run([*launch, *flags, "-m", "lightning_opd.cli", *args], check=check, ACCELERATE_USE_CPU="1")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


# Independent of how rows fall into micro-batches and processes: the loss (gold term included), the
# gradient, drift, the token-mean metrics (adv_mean, weighted by tokens) and the sample-reduced ones
# (base_loss, gold_nll: added up as the loss is).
COMPARED = (
    "loss", "grad_norm", "drift_kl", "drift_ess", "drift_outside", "adv_mean", "clip_frac", "base_loss", "gold_nll"
)  # fmt: skip


WEIGHT_ATOL = 1e-5


def _assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and a["response_tokens"] == b["response_tokens"], a["step"]
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


@pytest.mark.timeout(1800)  # four training runs, three of them two-process launches: ~100 s on 2 idle cores
def test_two_processes_train_like_one(sft_student_dir, micro_store, opd_prompts, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Two micro-batches per process in both runs, so DDP's no_sync accumulation is exercised too.
    _run(
        [
            sys.executable,
            "-m",
            "lightning_opd.cli",
            *_train_args(sft_student_dir, micro_store, opd_prompts, one, 2),
        ]
    )
    # In-training eval at step 2 runs on the main process alone, the other waiting.
    evaluation = ["--eval-prompts", opd_prompts, "--eval-every", 2, "--eval-limit", 4]
    args_two = [*_train_args(sft_student_dir, micro_store, opd_prompts, two, 1), *evaluation]
    result = _launch_two(args_two)
    assert result.stdout.count("no teacher loaded") == 1  # only the main process logs

    reference, metrics = _metrics(one), _metrics(two)
    assert len(metrics) == 3  # only the main process writes metrics
    _assert_same_steps(metrics, reference)
    assert [("eval_accuracy" in r) for r in metrics] == [False, True, True]  # every 2 steps and the last
    assert metrics[1]["loss"] != reference[0]["loss"]  # the steps train: not one repeated value
    final_one, final_two = _weights(one / "final"), _weights(two / "final")
    assert final_one.keys() == final_two.keys()
    # Weights to 1e-5 = 0.3% of what 3 steps at lr 1e-3 can move one: Adam divides each gradient by its
    # own running scale, so an element whose gradient is near zero turns the ~1e-7 relative difference
    # of another summation order (all-reduce vs accumulation) into a few 1e-6 of its step (measured:
    # at most 2.8e-6, on v_proj). The loss and gradient norm above agree to 1e-4 relative.
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-4, atol=WEIGHT_ATOL, msg=name)
    assert not torch.equal(
        final_two["model.embed_tokens.weight"], _weights(sft_student_dir)["model.embed_tokens.weight"]
    )

    # Resume: the same command again restarts from checkpoints/step-2 (one RNG state per process)
    # and must redo step 3 exactly.
    checkpoint = two / "checkpoints" / "step-2"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    result = _launch_two(args_two)
    assert "resumed from" in result.stdout and f"{checkpoint}" in result.stdout
    _assert_same_steps(_metrics(two), reference)
    for name, tensor in final_one.items():
        torch.testing.assert_close(
            _weights(two / "final")[name], tensor, rtol=1e-4, atol=WEIGHT_ATOL, msg=name
        )


def _launch_fsdp2(args: list, check: bool = True) -> subprocess.CompletedProcess:
    """The README's FSDP2 command (its accelerate config file) with two processes on CPU."""
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    flags = ["--config_file", REPO / "examples" / "accelerate" / "fsdp2.yaml", "--num_processes", 2]
    flags += ["--main_process_port", 29500 + (os.getpid() + 7) % 1000]
    return _run([*launch, *flags, "-m", "lightning_opd.cli", *args], check=check, ACCELERATE_USE_CPU="1")


# FSDP2 reduce-scatters gradients in another order than one process sums them (~1e-7 apart); Adam
# divides by sqrt(v), so on a near-zero gradient that difference becomes up to ~lr / 300 in a weight.
FSDP2_ATOL = 1e-5


def test_fsdp2_two_processes_match_one_and_resume_from_a_sharded_checkpoint(
    sft_student_dir, micro_store, opd_prompts, tmp_path
):
    """FSDP2 (one unit per decoder layer, the scorer as root, StableOPD's gold mixture on): the same
    steps and final weights as one process; the rerun resumes from the sharded step-2 checkpoint and
    redoes step 3 exactly; the gathered final model loads with from_pretrained."""
    one, two = tmp_path / "one", tmp_path / "fsdp2"
    _run(
        [
            sys.executable,
            "-m",
            "lightning_opd.cli",
            *_train_args(sft_student_dir, micro_store, opd_prompts, one, 2),
        ]
    )
    result = _launch_fsdp2(_train_args(sft_student_dir, micro_store, opd_prompts, two, 1))
    assert result.stdout.count("no teacher loaded") == 1
    reference = _metrics(one)
    _assert_same_steps(_metrics(two), reference)
    final_one, final_two = _weights(one / "final"), _weights(two / "final")
    assert final_one.keys() == final_two.keys()
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-4, atol=FSDP2_ATOL, msg=name)

    checkpoint = two / "checkpoints" / "step-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()  # sharded (torch.distributed.checkpoint)
    result = _launch_fsdp2(_train_args(sft_student_dir, micro_store, opd_prompts, two, 1))
    assert "resumed from" in result.stdout and f"{checkpoint}" in result.stdout
    _assert_same_steps(_metrics(two), reference)
    for name, tensor in final_one.items():
        torch.testing.assert_close(
            _weights(two / "final")[name], tensor, rtol=1e-4, atol=FSDP2_ATOL, msg=name
        )

    from transformers import AutoModelForCausalLM

    from lightning_opd.stage2.batch import collate, student_token_batch

    rows = [{"prompt_id": "p", "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [7, 8, 9],
             "teacher_logprobs": [0.0] * 3, "behavior_logprobs": [0.0] * 3}]  # fmt: skip
    batch = collate(rows, 8, 0)
    with torch.no_grad():
        got, want = (
            student_token_batch(
                AutoModelForCausalLM.from_pretrained(d).eval(), batch, needs_topk=False, chunk_size=4
            )
            for d in (two / "final", one / "final")
        )
    torch.testing.assert_close(got.student_logprobs, want.student_logprobs, rtol=0, atol=1e-5)


def test_fsdp2_with_lora_and_gradient_checkpointing_matches_one_process(
    sft_student_dir, micro_store, opd_prompts, tmp_path
):
    """The 8B-on-a-few-GPUs configuration: adapters (frozen base weights in the same FSDP units),
    checkpointed layers (recomputed inside FSDP's unsharded window) and packed micro-batches (the
    block-diagonal mask through FSDP's forward). Merged final model and adapter."""
    scale = ["--lora-rank", 4, "--gradient-checkpointing", "--pack", "--lr", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        [
            sys.executable,
            "-m",
            "lightning_opd.cli",
            *_train_args(sft_student_dir, micro_store, opd_prompts, one, 2),
            *scale,
        ]
    )
    _launch_fsdp2([*_train_args(sft_student_dir, micro_store, opd_prompts, two, 1), *scale])
    _assert_same_steps(_metrics(two), _metrics(one))
    assert (two / "final" / "adapter" / "adapter_model.safetensors").exists()
    final_one, final_two = _weights(one / "final"), _weights(two / "final")
    assert final_one.keys() == final_two.keys()
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-4, atol=FSDP2_ATOL, msg=name)


def test_fsdp2_refuses_in_training_eval(sft_student_dir, micro_store, opd_prompts, tmp_path):
    args = _train_args(sft_student_dir, micro_store, opd_prompts, tmp_path / "e", 1)
    result = _launch_fsdp2([*args, "--eval-prompts", opd_prompts, "--eval-every", 1], check=False)
    assert result.returncode != 0 and "not available under FSDP2" in result.stderr
    assert "lopd eval" in result.stderr


@pytest.mark.parametrize(
    "kind,version",
    [(DistributedType.FSDP, 1), (DistributedType.DEEPSPEED, None), (DistributedType.MEGATRON_LM, None)],
)
def test_other_sharded_modes_are_refused_with_the_fsdp2_command(kind, version):
    # accelerate never selects FSDP1 or DeepSpeed on CPU (both need a GPU), so the refusal is checked on
    # the distributed type that `Accelerator().distributed_type` would report on GPUs.
    with pytest.raises(ConfigError, match=r"does not support .*use FSDP2: `accelerate launch --config_file"):
        check_distributed(kind, version)
    check_distributed(DistributedType.FSDP, 2)
    for allowed in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed(allowed)


def test_sft_refuses_two_processes(micro_teacher_dir, micro_student_dir, opd_prompts, tmp_path):
    # Stage zero's chunked loss runs past the prepared model's forward: under DDP it would train two
    # unsynchronised copies, so it must stop with what to do instead.
    args = ["sft", "--teacher", micro_teacher_dir, "--student", micro_student_dir, "--prompts", opd_prompts]
    args += ["--out", tmp_path / "sft", "--steps", 2, "--warmup-steps", 1, "--max-new-tokens", 4]
    result = _launch_two(args, check=False)
    assert result.returncode != 0
    assert "lopd sft runs in one process" in result.stderr
