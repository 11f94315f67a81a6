"""Stage one on every GPU of one machine: ``lopd precompute --local-workers N``.

Starts N copies of the same ``lopd precompute`` as shard workers ``--shard-index i --num-shards N``
(exactly what a Slurm array or Ray does on a cluster), each pinned to its own GPUs through
``CUDA_VISIBLE_DEVICES``: as many as the larger of the sampler's and the scorer's tensor-parallel
sizes, so a teacher at ``--scoring-tensor-parallel-size 2`` on 8 GPUs runs 4 workers. Without the
pinning every worker would land on GPU 0. On a machine without GPUs the workers share the CPU cores.

No scheduler beyond starting N local processes: each worker commits its parts as it goes, the last one
to finish commits the manifest (``lopd store finalize`` here otherwise), and a rerun of the same
command after a crash or a kill resumes every worker from its committed parts.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

from lightning_opd.config import config_to_argv
from lightning_opd.errors import ConfigError, LopdError


class WorkerError(LopdError):
    """A local shard worker failed; its committed parts are kept."""


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` as given, else every device."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def gpu_groups(workers: int, per_worker: int, gpus: list[str]) -> list[list[str]] | None:
    """Each worker's GPU ids, or None on a machine without GPUs."""
    if not gpus:
        return None
    if workers * per_worker > len(gpus):
        raise ConfigError(
            f"--local-workers {workers} with {per_worker} GPU(s) each needs {workers * per_worker} GPUs, but "
            f"{len(gpus)} are visible ({','.join(gpus)}); pass --local-workers {max(1, len(gpus) // per_worker)}"
        )
    return [gpus[i * per_worker : (i + 1) * per_worker] for i in range(workers)]


def run_local_workers(config, command: str, log=print) -> Path:
    """Run ``config`` (a ``PrecomputeConfig`` with ``local_workers`` > 1) as N local shard workers;
    their output is relayed line by line, prefixed with the worker. Raises ``WorkerError`` when one
    fails (after all have ended)."""
    n = config.local_workers
    per_worker = max(config.tensor_parallel_size, getattr(config, "scoring_tensor_parallel_size", 1))
    groups = gpu_groups(n, per_worker, visible_gpus())
    cores = os.cpu_count() or 1
    procs = []
    for i in range(n):
        worker = dataclasses.replace(config, shard_index=i, num_shards=n, local_workers=1)
        env = dict(os.environ)
        if groups is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[i])
        else:  # share the CPU: one worker per core group, not N x all cores
            env.setdefault("OMP_NUM_THREADS", str(max(1, cores // n)))
        argv = [sys.executable, "-m", "lightning_opd.cli", command, *config_to_argv(worker)]
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if groups is not None else "CPU"
        log(f"stage 1: worker {i}/{n} on {where}")
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    threads = [threading.Thread(target=_relay, args=(p, f"[worker {i}] ", log)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        raise WorkerError(
            f"stage 1: worker(s) {', '.join(map(str, failed))} of {n} failed (exit status "
            f"{', '.join(str(codes[i]) for i in failed)}; their output is above); committed parts are kept: "
            "rerun the same command to resume"
        )
    return Path(config.out)


def _relay(proc: subprocess.Popen, prefix: str, log) -> None:
    for line in proc.stdout:
        log(prefix + line.rstrip("\n"))
