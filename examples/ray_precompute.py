"""Stage one on a Ray cluster: one Ray task per shard, each running the same entry point as a single
run (`lopd precompute ... --shard-index i --num-shards N`), then `lopd store finalize` and verify.

    python examples/ray_precompute.py --num-shards 8 --gpus-per-shard 1 -- \\
        --student runs/sft --teacher runs/teacher --prompts prompts/opd.jsonl --out runs/store --n 4

Everything after ``--`` goes to `lopd precompute` as it is. Ray only places the tasks: worker i does
the parts p with p % N == i and commits each part as it goes, so a task that Ray retries (or a rerun
of this script) resumes where it stopped. ``--out`` must be on storage every node sees.

Ray is optional (``pip install ray``); connect to a running cluster with ``--address auto`` (or the
RAY_ADDRESS variable), or leave it out to start a local one. For ``--backend vllm`` with
``--tensor-parallel-size k``, give each task ``--gpus-per-shard k``.
"""

from __future__ import annotations

import argparse
import sys


def run_shard(precompute_args: list[str], shard_index: int, num_shards: int) -> int:
    """One shard, in a Ray worker: the `lopd` command line, in process."""
    from lightning_opd.cli import main

    argv = [
        "precompute",
        *precompute_args,
        "--shard-index",
        str(shard_index),
        "--num-shards",
        str(num_shards),
    ]
    status = main(argv)
    if status != 0:  # lopd printed why; make ray.get fail (Ray retries crashed workers, not errors)
        raise RuntimeError(f"lopd precompute shard {shard_index} of {num_shards} exited with status {status}")
    return shard_index


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="stage one as one Ray task per shard, then finalize",
        usage="%(prog)s --num-shards N [options] -- LOPD_PRECOMPUTE_FLAGS...",
    )
    parser.add_argument("--num-shards", type=int, required=True, help="Ray tasks (= store shards of work)")
    parser.add_argument("--gpus-per-shard", type=float, default=0, help="GPUs Ray reserves per task")
    parser.add_argument("--cpus-per-shard", type=float, default=1, help="CPUs Ray reserves per task")
    parser.add_argument(
        "--max-retries", type=int, default=2, help="Ray retries of a failed task (they resume)"
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")
    if "--" not in argv:
        parser.error("pass the `lopd precompute` flags after `--`")
    split = argv.index("--")
    args, rest = parser.parse_args(argv[:split]), argv[split + 1 :]
    if args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1, got {args.num_shards}")
    if "--out" not in rest or rest.index("--out") + 1 >= len(rest):
        parser.error("the `lopd precompute` flags after `--` must include --out STORE_DIR")
    if any(flag in rest for flag in ("--shard-index", "--num-shards")):
        parser.error("leave --shard-index/--num-shards out: this script sets them per task")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, precompute_args = parse(sys.argv[1:] if argv is None else argv)
    try:
        import ray
    except ImportError:
        print(
            "ray_precompute: Ray is not installed; pip install ray (or use examples/slurm/)", file=sys.stderr
        )
        return 2
    from lightning_opd.cli import main as lopd

    out = precompute_args[precompute_args.index("--out") + 1]
    ray.init(address=args.address, num_cpus=args.num_cpus)
    task = ray.remote(
        num_cpus=args.cpus_per_shard, num_gpus=args.gpus_per_shard, max_retries=args.max_retries
    )(run_shard)
    refs = [task.remote(precompute_args, i, args.num_shards) for i in range(args.num_shards)]
    try:
        for done in ray.get(refs):  # raises the first task's error once its retries are spent
            print(f"ray_precompute: shard {done} of {args.num_shards} done")
    finally:
        ray.shutdown()
    status = lopd(["store", "finalize", out, "--num-shards", str(args.num_shards)])
    return status or lopd(["store", "verify", out])


if __name__ == "__main__":  # a vLLM engine in a task starts worker processes: keep the guard
    sys.exit(main())
