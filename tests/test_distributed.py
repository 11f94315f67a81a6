"""Stage two under ``accelerate launch`` with two processes (DDP over gloo on CPU).

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
from pipelines.train import check_distributed

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


# Independent of how rows fall into micro-batches. The objective's own metrics (adv_mean, gold_nll)
# are per-micro-batch values averaged by rows, so they differ even in one process with another
# --micro-batch-size; the loss (gold term included) and the gradient do not.
COMPARED = ("loss", "grad_norm", "drift_kl", "drift_ess", "drift_outside")


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
    result = _launch_two(_train_args(sft_student_dir, micro_store, opd_prompts, two, 1))
    assert result.stdout.count("no teacher loaded") == 1  # only the main process logs

    reference, metrics = _metrics(one), _metrics(two)
    assert len(metrics) == 3  # only the main process writes metrics
    _assert_same_steps(metrics, reference)
    assert metrics[1]["loss"] != reference[0]["loss"]  # the steps train: not one repeated value
    final_one, final_two = _weights(one / "final"), _weights(two / "final")
    assert final_one.keys() == final_two.keys()
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(
        final_two["model.embed_tokens.weight"], _weights(sft_student_dir)["model.embed_tokens.weight"]
    )

    # Resume: the same command again restarts from checkpoints/step-2 (one RNG state per process)
    # and must redo step 3 exactly.
    checkpoint = two / "checkpoints" / "step-2"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    result = _launch_two(_train_args(sft_student_dir, micro_store, opd_prompts, two, 1))
    assert "resumed from" in result.stdout and f"{checkpoint}" in result.stdout
    _assert_same_steps(_metrics(two), reference)
    for name, tensor in final_one.items():
        torch.testing.assert_close(_weights(two / "final")[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_training_is_refused_with_what_to_use(kind):
    # accelerate 1.15 never selects FSDP or DeepSpeed on CPU (both need a GPU), so the refusal is
    # checked on the distributed type that `Accelerator().distributed_type` would report on GPUs.
    with pytest.raises(ConfigError, match=r"does not support .*Use DDP: `accelerate launch --multi_gpu"):
        check_distributed(kind)
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
