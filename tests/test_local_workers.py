"""``lopd precompute --local-workers N`` (issue 20): N shard workers on one machine give the store one
worker gives, and a killed run resumes; the GPU pinning is checked on its own (no GPU here)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import precompute_config, run_lopd
from test_stage1 import store_rows

from lightning_opd.config import config_to_argv
from lightning_opd.errors import ConfigError
from lightning_opd.stage1.local import gpu_groups
from lightning_opd.store import verify_store
from pipelines import precompute
from storage_schemas.logprob_store_v1 import COMMITS_DIR, ROLLOUTS_SUBDIR

QUIET = dict(log=lambda *_: None)


def test_two_local_workers_write_the_store_one_worker_writes(
    tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts
):
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "one"), **QUIET
    )
    config = precompute_config(
        sft_student_dir,
        micro_teacher_dir,
        opd_prompts,
        tmp_path / "two",
        local_workers=2,
        allow_duplicate=True,
    )
    result = run_lopd("precompute", *config_to_argv(config))
    assert "[worker 0]" in result.stdout and "[worker 1]" in result.stdout
    assert "2 local workers done" in result.stdout
    assert_same_content(tmp_path / "two", tmp_path / "one")
    assert verify_store(tmp_path / "two").ok


def test_a_killed_local_run_resumes(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "one", part_size=1),
        **QUIET,
    )
    out = tmp_path / "killed"
    config = precompute_config(
        sft_student_dir,
        micro_teacher_dir,
        opd_prompts,
        out,
        part_size=1,
        local_workers=2,
        allow_duplicate=True,
    )
    argv = [sys.executable, "-m", "lightning_opd.cli", "precompute", *config_to_argv(config)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    commits = out / ROLLOUTS_SUBDIR / COMMITS_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(commits.glob("*"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    proc.wait()
    assert not (out / "manifest.json").exists(), "finished before the kill: nothing to resume"
    result = run_lopd("precompute", *config_to_argv(config))
    assert "2 local workers done" in result.stdout
    # The resumed worker batches only its remaining prompts: same rollouts, log-probs within rounding.
    assert_same_content(out, tmp_path / "one")
    assert verify_store(out).ok


def assert_same_content(got, want):
    """The same rollouts (ids exact); log-probs equal up to float rounding (~5e-7), which moves with
    the sampler's batch composition and the worker's thread count."""
    a_rows, b_rows = store_rows(got), store_rows(want)
    key = lambda r: (r["prompt_id"], r["sample_index"], r["prompt_ids"], r["response_ids"])  # noqa: E731
    assert [key(r) for r in a_rows] == [key(r) for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        assert {k: v for k, v in a.items() if "logprobs" not in k} == {
            k: v for k, v in b.items() if "logprobs" not in k
        }
        for name in (k for k in a if "logprobs" in k and a[k] is not None):
            assert a[name] == pytest.approx(b[name], abs=1e-5), (a["prompt_id"], name)


def test_gpu_pinning_gives_each_worker_its_own_gpus():
    gpus = [str(i) for i in range(8)]
    assert gpu_groups(8, 1, gpus) == [[g] for g in gpus]
    assert gpu_groups(4, 2, gpus) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]  # a TP-2 teacher
    assert gpu_groups(2, 1, []) is None  # no GPU: the workers share the CPU
    with pytest.raises(ConfigError, match="needs 10 GPUs, but 8 are visible.*--local-workers 4"):
        gpu_groups(5, 2, gpus)


def test_local_workers_refuse_explicit_shards(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path):
    with pytest.raises(ConfigError, match="--local-workers starts the shard workers itself"):
        precompute_config(
            sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path, local_workers=2, num_shards=2
        )
