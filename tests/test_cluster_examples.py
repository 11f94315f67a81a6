"""Stage one under a real scheduler's contract: examples/slurm (run here with bash, the SLURM_*
variables set as Slurm sets them for an array) and examples/ray_precompute.py (a local Ray).

Each runs one worker per shard through the real `lopd precompute`, then finalize and verify; the
store must hold exactly the rows of a single-worker store.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import precompute_config

from lightning_opd.store import open_store, verify_store
from pipelines import precompute

ROOT = Path(__file__).resolve().parents[1]
NUM_SHARDS = 3  # 10 prompts in parts of 4: three parts, one per worker
# The settings of conftest.precompute_config, as `lopd precompute` flags.
FLAGS = ["--max-new-tokens", "8", "--part-size", "4", "--backend", "transformers", "--temperature", "1.0"]
FLAGS += ["--seed", "3", "--allow-duplicate"]  # the single-worker store below has the same content


def store_rows(root):
    store = open_store(root)
    rows = [r for batch in store.iter_batches() for r in batch.to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"]))


@pytest.fixture
def single_store(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    out = tmp_path / "single"
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, out), log=lambda *_: None
    )
    return out


def env(**extra):
    # The worktree's package first, whatever is installed; LOPD_STORE_CACHE comes from conftest.
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **{k: str(v) for k, v in extra.items()},
    }


def test_slurm_array_example(tmp_path, single_store, sft_student_dir, micro_teacher_dir, opd_prompts):
    out = tmp_path / "sharded"
    settings = dict(
        STUDENT=sft_student_dir,
        TEACHER=micro_teacher_dir,
        PROMPTS=opd_prompts,
        OUT=out,
        LOPD=f"{sys.executable} -m lightning_opd.cli",
    )
    script = ROOT / "examples" / "slurm" / "precompute.sbatch"
    # Outside an array the script refuses to guess its shard.
    refused = subprocess.run(["bash", str(script)], env=env(**settings), capture_output=True, text=True)
    assert refused.returncode != 0 and "not an array task" in refused.stderr
    # What `sbatch --array=5-7` does: task ids 5..7, TASK_MIN 5, TASK_COUNT 3; all tasks at once.
    workers = [
        subprocess.Popen(
            ["bash", str(script), *FLAGS],
            env=env(
                **settings,
                SLURM_ARRAY_TASK_ID=5 + i,
                SLURM_ARRAY_TASK_MIN=5,
                SLURM_ARRAY_TASK_COUNT=NUM_SHARDS,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_SHARDS)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)
    assert all(f"shard {i} of {NUM_SHARDS}" in log for i, log in enumerate(logs))
    # The dependent job: finalize (a no-op when the last worker already did it), then verify.
    finalize = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm" / "finalize.sbatch")],
        env=env(**settings, NUM_SHARDS=NUM_SHARDS),
        capture_output=True,
        text=True,
    )
    assert finalize.returncode == 0, finalize.stdout + finalize.stderr
    assert "OK" in finalize.stdout
    assert verify_store(out).ok
    assert len(open_store(out).manifest.shards) == NUM_SHARDS
    assert store_rows(out) == store_rows(single_store)


def test_slurm_finalize_refuses_an_incomplete_store(
    tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts
):
    out = tmp_path / "half"
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, out, shard_index=0, num_shards=2),
        log=lambda *_: None,
    )
    finalize = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm" / "finalize.sbatch")],
        env=env(OUT=out, NUM_SHARDS=2, LOPD=f"{sys.executable} -m lightning_opd.cli"),
        capture_output=True,
        text=True,
    )
    assert finalize.returncode != 0 and "--shard-index 1 --num-shards 2" in finalize.stderr


# Slow: a local Ray instance plus three workers that each import torch take minutes on 2 shared cores
# (ray itself is not in the dev extra; see docs/CLUSTER.md).
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_example(tmp_path, single_store, sft_student_dir, micro_teacher_dir, opd_prompts):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ray_precompute.py"), "--num-shards", str(NUM_SHARDS)]
        + ["--num-cpus", "2", "--cpus-per-shard", "0.5", "--"]
        + ["--student", sft_student_dir, "--teacher", micro_teacher_dir, "--prompts", opd_prompts]
        + ["--out", out, *FLAGS],
        env=env(RAY_DISABLE_USAGE_STATS=1),
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert store_rows(out) == store_rows(single_store)
