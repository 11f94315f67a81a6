"""Tables, CSV files and charts of the demo's and `lopd compare`'s results (the jobs only run things)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from lightning_opd.reporting.stats import mean_ci
from storage_schemas.logprob_store_v1 import MANIFEST_FILE, ROLLOUTS_SUBDIR

CSV_COLUMNS = (
    "seed",
    "method",
    "kind",
    "status",
    "accuracy",
    "trunc_rate",
    "rep_rate",
    "mean_response_tokens",
    "train_s",
    "median_step_s",
    "stage_one_s",
    "total_s",
    "model",
)


def median_step_seconds(metrics: Path) -> float:
    """Median optimizer-step time: robust to other jobs on a shared machine, unlike the wall-clock."""
    times = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines() if line]
    return statistics.median(times)


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def plot_compare(results: list[dict], path: Path) -> None:
    """Accuracy vs wall-clock, one marker per method (circles offline, squares online), legend outside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(r for r in results if r["status"] == "ok"):
        if r["kind"] == "baseline":
            ax.axhline(100 * r["accuracy"], color="gray", linestyle="--", label=f"{r['method']} (start)")
            continue
        marker = "o" if r["kind"] == "offline" else "s"
        ax.scatter(
            r["total_s"], 100 * r["accuracy"], color=colors[i % len(colors)], marker=marker, label=r["method"]
        )
    ax.set_xlabel("wall-clock (s): offline = stage one + training; online = training")
    ax.set_ylabel("greedy accuracy (%)")
    ax.set_title("OPD method family from one SFT student")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(seconds) -> str:
    return "unknown" if seconds is None else f"{seconds:.0f} s"


def format_compare_table(results: list[dict]) -> str:
    header = [
        "method",
        "kind",
        "accuracy",
        "trunc",
        "rep",
        "train s",
        "step s",
        "stage1 s",
        "total s",
        "status",
    ]
    rows = []
    for r in results:
        ok = r["status"] == "ok"
        rows.append(
            [
                r["method"],
                r["kind"],
                f"{100 * r['accuracy']:.1f}%" if ok else "-",
                f"{100 * r['trunc_rate']:.0f}%" if ok else "-",
                f"{100 * r['rep_rate']:.0f}%" if ok else "-",
                f"{r['train_s']:.1f}",
                f"{r['median_step_s']:.3f}" if r.get("median_step_s") is not None else "-",
                _fmt(r.get("stage_one_s")).replace(" s", ""),
                f"{r['total_s']:.1f}" if ok else "-",
                r["status"],
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summarize(per_seed: list[dict]) -> dict:
    """Mean ± 95% CI over seeds of each model's accuracy, its gain over its own SFT start, its time."""
    out = {}
    for model in per_seed[0]["accuracy"]:
        acc = [s["accuracy"][model] for s in per_seed]
        gain = [s["accuracy"][model] - s["accuracy"]["SFT student"] for s in per_seed]
        secs = [s["seconds"].get(model, 0.0) for s in per_seed]
        out[model] = {
            "accuracy": mean_ci(acc).as_dict(),
            "gain": mean_ci(gain).as_dict(),
            "seconds": mean_ci(secs).as_dict(),
        }
    return out


def format_results(summary: dict, eval_prompts: int) -> str:
    n = len(summary["seeds"])
    spread = f"mean ± 95% CI over {n} seeds" if n > 1 else "one seed; --seeds 3 for the spread"
    header = ["model", f"greedy accuracy ({spread})", "vs SFT", "wall time"]
    rows = [
        [
            "teacher",
            f"{100 * summary['teacher_accuracy']:.1f}%",
            "",
            "cached" if summary["teacher_s"] < 5 else f"{summary['teacher_s']:.0f} s",
        ]
    ]
    for model, s in summary["summary"].items():
        acc, gain, secs = (_ci(s[k]) for k in ("accuracy", "gain", "seconds"))
        is_sft = model == "SFT student"
        rows.append(
            [
                model,
                acc.format() + "%",
                "" if is_sft else f"{100 * gain.mean:+.1f}",
                "" if is_sft else f"{secs.mean:.0f} s",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [
        f"lightning-opd demo: {eval_prompts} held-out problems",
        line(header),
        line(["-" * w for w in widths]),
    ]
    lines += [line(r) for r in rows]
    stages = summary["seeds"][0]["timings_s"]
    lines += ["", "time per stage (mean over seeds):"] + [
        f"  {k:<36} {sum(s['timings_s'][k] for s in summary['seeds']) / n:7.1f} s" for k in stages
    ]
    lines.append(
        "wall time: offline = stage one (rollouts + teacher scoring, shared by the offline runs) + training; "
        "online = training with the live teacher"
    )
    return "\n".join(lines)


def _ci(d: dict):
    return mean_ci(d["values"])


def stage_one_seconds_from_files(store_root: Path) -> float | None:
    """Stage-one wall-clock of a store `lopd precompute` wrote: rollouts header written -> manifest written.

    File times survive a move but not a plain copy; anything implausible gives None.
    """
    start = store_root / ROLLOUTS_SUBDIR / "commits" / "header.json"
    end = store_root / MANIFEST_FILE
    if not (start.exists() and end.exists()):
        return None
    seconds = end.stat().st_mtime - start.stat().st_mtime
    return seconds if seconds > 0 else None
