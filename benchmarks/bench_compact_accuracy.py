"""What the compact (16-bit) log-prob encoding costs stage two on the toy task, paired per seed.

    LOPD_CACHE=.cache/lightning-opd .venv/bin/python benchmarks/bench_compact_accuracy.py [--seeds 3]
        [--objective topk --topk-scale 32]

Per seed, `lopd demo`'s stages with its defaults: prompt sets, SFT student, store (float32), then
`lopd store compact` of that store, and the default stage two (sampled-token objective, trust
region 0.2) from the same SFT student on each store; greedy accuracy on the 500 held-out problems.
Prints accuracies and the paired difference (compact - float32) per seed, then each as mean ± 95% CI.
``--objective topk`` trains the top-k objective instead (the one that reads the top-k columns), and
``--topk-scale N`` compacts with the format 1.3 compact top-k (`lopd store compact --topk-scale N`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_opd.prompts import load_prompts
from lightning_opd.reporting.stats import mean_ci
from lightning_opd.store import tools
from pipelines import demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", default="runs/bench-compact")
    parser.add_argument("--objective", choices=("lightning", "topk"), default="lightning")
    parser.add_argument("--topk-scale", type=int, default=0, help="0: 1.2 compact; N: 1.3 compact top-k")
    args = parser.parse_args()
    config = demo.DemoConfig(workdir=args.workdir, objectives=args.objective)
    teacher = demo.toy_teacher(config, print)
    rows = []
    for seed in range(args.seeds):
        work = Path(args.workdir) / f"seed-{seed}"
        prompts = demo.toy_prompts(config, work, seed)
        records = load_prompts(prompts["eval"])
        student = demo.stage_zero(config, teacher, work, prompts, seed, print)
        store = demo.stage_one(config, teacher, student, work, prompts, seed, print)
        suffix = f"-topk{args.topk_scale}" if args.topk_scale else ""
        compact = work / f"store-compact{suffix}"
        if not (compact / "manifest.json").exists():
            tools.compact_store(store, compact, allow_duplicate=True, topk_scale=args.topk_scale or None)
        row = {"seed": seed, "sft": demo._accuracy(student, records, config.horizon)}
        for name, source, where in (
            ("float32", store, work),
            ("compact", compact, work / f"compact{suffix}"),
        ):
            final = demo.stage_two(
                config, args.objective, student, teacher, source, where, prompts, seed, print
            )
            row[name] = demo._accuracy(final, records, config.horizon)
        row["diff"] = row["compact"] - row["float32"]
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{'seed':>4} {'SFT':>7} {'float32':>8} {'compact':>8} {'diff':>7}")
    for r in rows:
        print(
            f"{r['seed']:>4} {r['sft']:>7.1%} {r['float32']:>8.1%} {r['compact']:>8.1%} {100 * r['diff']:>+7.1f}"
        )
    for name in ("sft", "float32", "compact", "diff"):
        print(
            f"{name:>8}: {mean_ci(r[name] for r in rows).format()} points (mean ± 95% CI over {len(rows)} seed(s))"
        )


if __name__ == "__main__":
    main()
