"""What an online OPD step costs next to an offline one, on the same batch (ratios are what matter).

    .venv/bin/python benchmarks/bench_online_step.py [--prompts 16 --n 4 --horizon 48 --repeats 3 --spec toy]

Online step = sampling by the current student (transformers sampler, in-memory weights) + scoring
by a live teacher in the same process + the update. Offline step (Lightning OPD) = the update only,
on the same rows, as if they came from a store. Models are the toy specs, randomly initialised
(timing only: they never emit EOS, so every rollout runs the full horizon, the worst case).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opd.scoring import score_sequences  # noqa: E402
from lightning_opd.stage1.rollout import SamplingConfig  # noqa: E402
from lightning_opd.stage2.objectives import make_objective  # noqa: E402
from lightning_opd.stage2.online import rollout_rows, sample_rollouts  # noqa: E402
from lightning_opd.stage2.runs import timer  # noqa: E402
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients  # noqa: E402
from lightning_opd.toy.models import MICRO_SPEC, STUDENT_SPEC, TEACHER_SPEC, build_model  # noqa: E402
from lightning_opd.toy.task import sample_problems  # noqa: E402
from lightning_opd.toy.tokenizer import build_char_tokenizer  # noqa: E402


def one_step(student, teacher, tokenizer, optimizer, prompts, keys, args, seed: int, online: bool, rows=None):
    """Seconds of (sampling, scoring, update); the rows, so the offline step can reuse the batch."""
    t0 = timer()
    if rows is None:
        sampling = SamplingConfig(
            n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.horizon, seed=seed, batch_size=256
        )
        rollouts = sample_rollouts(student, tokenizer, prompts, keys, sampling)
        t1 = timer()
        scores = score_sequences(
            teacher, [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts]
        )
        t2 = timer()
        rows = rollout_rows(rollouts, scores)
    else:
        t1 = t2 = t0
    inputs = UpdateInputs(
        objective=make_objective("lightning"),
        horizon=args.horizon,
        pad_id=tokenizer.pad_token_id,
        micro_batch_size=len(rows),
        ratio_to_sampler=online,
    )
    accumulate_gradients(student, rows, inputs, step=1)
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = timer()
    return (t1 - t0, t2 - t1, t3 - t2), rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--horizon", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spec", choices=("toy", "micro"), default="toy", help="toy: the demo's model sizes")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--out", default="benchmarks/results", help="directory for the CSV table and PNG chart"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    student_spec, teacher_spec = (
        (STUDENT_SPEC, TEACHER_SPEC) if args.spec == "toy" else (MICRO_SPEC, MICRO_SPEC)
    )
    student = build_model(student_spec, tokenizer, seed=1).train()
    teacher = build_model(teacher_spec, tokenizer, seed=2).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    problems = sample_problems("opd", args.prompts, digits=(3,))
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    keys = [p.prompt_id for p in problems]

    one_step(student, teacher, tokenizer, optimizer, prompts, keys, args, seed=0, online=True)  # warm-up
    online, offline = [], []
    for r in range(args.repeats):
        times, rows = one_step(
            student, teacher, tokenizer, optimizer, prompts, keys, args, seed=r + 1, online=True
        )
        online.append(times)
        offline.append(
            one_step(student, teacher, tokenizer, optimizer, prompts, keys, args, r, False, rows)[0][2]
        )

    sample, score, update = (statistics.median(t[i] for t in online) for i in range(3))
    off = statistics.median(offline)
    total = sample + score + update
    print(
        f"{args.prompts} prompts x {args.n} samples, horizon {args.horizon}, student {student_spec.describe()}, "
        f"teacher {teacher_spec.describe()}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'phase':<34}{'seconds':>10}{'x offline step':>16}")
    for name, seconds in (
        ("online: sampling (student)", sample),
        ("online: teacher scoring", score),
        ("online: update", update),
        ("online step, total", total),
        ("offline step (update only)", off),
    ):
        print(f"{name:<34}{seconds:>10.3f}{seconds / off:>16.2f}")
    from lightning_opd.reporting.plots import write_benchmark

    phases = {
        "sampling": sample,
        "teacher scoring": score,
        "update": update,
        "online total": total,
        "offline step": off,
    }
    write_benchmark(
        args.out,
        "online_step",
        [{"phase": k, "seconds": v, "x_offline": v / off} for k, v in phases.items()],
        x="phase",
        ys=["x_offline"],
        title="online OPD step, by phase, vs the offline step",
        ylabel="x offline step",
    )


if __name__ == "__main__":
    main()
