"""Plots of stores and training runs, shared by the notebooks and the command line.

    lopd store plot STORE_DIR --out DIR                 store figures (PNG)
    lopd plot-runs RUN_DIR [RUN_DIR ...] --out DIR      training-run figures (PNG)
    (also: python -m lightning_opd.reporting.plots store|runs ...)

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot): no GUI backend and no global
figure state, so the same functions work in a headless job, a test and a notebook (which shows the
saved PNG). Store data comes from polars (per-rollout scalars, read lazily over the manifest's
shard files) and from streaming helpers for token-level statistics, so nothing loads a whole store.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_opd.config import add_dataclass_args, config_from_args
from lightning_opd.errors import InputError, LopdError

METRICS_FILE = "metrics.jsonl"
FIGSIZE = (6.4, 4.0)
DPI = 110


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def new_figure(ncols: int = 1, *, width: float = FIGSIZE[0], height: float = FIGSIZE[1]):
    """A Figure and its axes (a list when ``ncols > 1``), detached from any GUI backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (list(axes) if ncols > 1 else axes)


def save_figure(fig, out_dir: str | Path, name: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------
# Store: data
# ---------------------------------------------------------------------------------------------


def scan_store(root: str | Path):
    """A polars LazyFrame over exactly the shard files the store's manifest lists (and its manifest)."""
    import polars as pl

    from lightning_opd.store.reader import open_store

    store = open_store(root)
    return pl.scan_parquet([str(p) for p in store.shard_paths]), store.manifest


def rollout_frame(lazy, columns: Sequence[str]):
    """One row per rollout: length, finish_reason, truncated, reward (if kept), mean_logratio (if scored).

    ``mean_logratio`` is the rollout's mean teacher − behaviour log-ratio (null for empty responses).
    Only scalars per rollout are materialised; the streaming engine reads the list columns in chunks.
    """
    import polars as pl

    length = pl.col("response_ids").list.len()
    exprs = [
        length.alias("length"),
        pl.col("finish_reason"),
        (pl.col("finish_reason") == "length").alias("truncated"),
    ]
    if "reward" in columns:
        exprs.append(pl.col("reward"))
    if "teacher_logprobs" in columns:
        ratio = (pl.col("teacher_logprobs").list.sum() - pl.col("behavior_logprobs").list.sum()) / length
        exprs.append(pl.when(length > 0).then(ratio).otherwise(None).alias("mean_logratio"))
    return lazy.select(exprs).collect(engine="streaming")


def rollout_rates(frame, manifest) -> dict[str, float | None]:
    """Truncation and empty rates from the frame; RepRate from the manifest (computed at write time)."""
    n = frame.height
    return {
        "truncated": float(frame["truncated"].sum()) / n if n else 0.0,
        "empty": float((frame["length"] == 0).sum()) / n if n else 0.0,
        "repetitive": manifest.stats.rep_rate,
    }


# ---------------------------------------------------------------------------------------------
# Store: plots
# ---------------------------------------------------------------------------------------------


def plot_length_distribution(
    ax, lengths: Sequence[int], finish_reasons: Sequence[str], *, horizon: int | None = None
):
    """Stacked histogram of response lengths, split by finish reason ('length' = truncated)."""
    lengths = list(lengths)
    top = max([*lengths, horizon or 0, 1])
    bins = min(50, top + 1)
    groups = {
        reason: [n for n, r in zip(lengths, finish_reasons) if r == reason] for reason in ("stop", "length")
    }
    ax.hist(
        list(groups.values()),
        bins=bins,
        range=(0, top + 1),
        stacked=True,
        label=["stop (EOS)", "length (truncated)"],
    )
    if horizon:
        ax.axvline(horizon, color="black", linestyle="--", linewidth=1, label=f"horizon {horizon}")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("rollouts")
    ax.set_title("Response length distribution")
    ax.legend()
    return ax


def plot_rates(ax, rates: dict[str, float | None]):
    """Bar chart of rollout health rates (missing rates, e.g. RepRate without text, are shown as n/a)."""
    names = list(rates)
    values = [rates[n] if rates[n] is not None else 0.0 for n in names]
    bars = ax.bar(names, values, color=["tab:red", "tab:gray", "tab:purple"][: len(names)])
    for bar, name in zip(bars, names):
        label = "n/a" if rates[name] is None else f"{rates[name]:.1%}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylim(0, max(1e-9, *values) * 1.2 if any(values) else 1.0)
    ax.set_ylabel("share of rollouts")
    ax.set_title("Truncation / empty / repetition rates")
    return ax


def plot_position_stats(ax, buckets: Sequence[dict[str, Any]]):
    """Mean teacher, behaviour and teacher − behaviour log-prob per response-position bucket."""
    x = [(b["start"] + b["end"] - 1) / 2 for b in buckets]
    for key, label in (
        ("mean_teacher_logprob", "teacher"),
        ("mean_behavior_logprob", "behaviour (student)"),
        ("mean_logratio", "teacher − behaviour"),
    ):
        y = [b[key] if b[key] is not None else float("nan") for b in buckets]
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("response position")
    ax.set_ylabel("mean log-prob per token")
    ax.set_title("Per-position log-probs")
    ax.legend()
    return ax


def plot_histogram(ax, edges: Sequence[float], counts: Sequence[int], *, xlabel: str, title: str):
    """A pre-binned histogram (e.g. ``tools.logratio_histogram``), drawn as bars."""
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge")
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    return ax


def plot_values_histogram(ax, values: Sequence[float], *, xlabel: str, title: str, bins: int = 40):
    values = [v for v in values if v is not None]
    ax.hist(values, bins=bins)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rollouts")
    ax.set_title(title)
    return ax


def store_figures(root: str | Path, out_dir: str | Path, *, bucket: int | None = None) -> dict[str, Path]:
    """Every store figure, saved as PNG under ``out_dir``; returns name -> path."""
    from lightning_opd.store.summary import position_stats
    from lightning_opd.store.tools import logratio_histogram

    lazy, manifest = scan_store(root)
    frame = rollout_frame(lazy, manifest.columns)
    paths = {}
    fig, ax = new_figure()
    plot_length_distribution(
        ax, frame["length"].to_list(), frame["finish_reason"].to_list(), horizon=manifest.horizon
    )
    paths["lengths"] = save_figure(fig, out_dir, "lengths")
    fig, ax = new_figure()
    plot_rates(ax, rollout_rates(frame, manifest))
    paths["rates"] = save_figure(fig, out_dir, "rates")
    fig, ax = new_figure()
    plot_position_stats(ax, position_stats(root, bucket))
    paths["positions"] = save_figure(fig, out_dir, "positions")
    if manifest.kind == "scored":
        hist = logratio_histogram(root)
        fig, axes = new_figure(2)
        plot_histogram(
            axes[0],
            hist.edges,
            hist.counts,
            xlabel="teacher − behaviour log-prob",
            title="Per-token advantage",
        )
        plot_values_histogram(
            axes[1],
            frame["mean_logratio"].to_list(),
            xlabel="mean over the rollout",
            title="Per-rollout advantage",
        )
        paths["advantage"] = save_figure(fig, out_dir, "advantage")
    return paths


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


def metrics_path(run: str | Path) -> Path:
    """``run``'s metrics.jsonl (``run`` may be the run directory or the file itself)."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise InputError(
            f"no {METRICS_FILE} at {run}; pass a `lopd train --out` directory or its metrics.jsonl"
        )
    return path


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; a torn last line (a run still writing) is skipped."""
    rows = []
    lines = metrics_path(run).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise InputError(f"{metrics_path(run)} line {number} is not JSON; the file is damaged") from None
    return rows


def run_label(run: str | Path, others: Sequence[str | Path]) -> str:
    """A short, unique label: the directory name, with its parent when names repeat."""
    path = Path(run)
    path = path.parent if path.name == METRICS_FILE else path
    names = [(Path(o).parent if Path(o).name == METRICS_FILE else Path(o)).name for o in others]
    return path.name if names.count(path.name) <= 1 else f"{path.parent.name}/{path.name}"


def load_runs(runs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    return {run_label(run, runs): read_metrics(run) for run in runs}


X_LABELS = {"step": "step", "elapsed_s": "time (s)"}


def plot_metric(ax, runs: dict[str, list[dict[str, Any]]], y: str, *, x: str = "step"):
    """``y`` against ``x`` for every run; rows without ``y`` (e.g. non-eval steps) are skipped."""
    for label, rows in runs.items():
        points = [(r[x], r[y]) for r in rows if r.get(y) is not None and r.get(x) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {X_LABELS.get(x, x)}")
    if ax.get_legend_handles_labels()[0]:  # no run logged ``y``: an empty legend would only warn
        ax.legend()
    return ax


def run_figures(runs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Loss and eval accuracy of every run, each against step and time (two panels), saved as PNG."""
    data = load_runs(runs)
    paths = {}
    for y in ("loss", "eval_accuracy"):
        fig, axes = new_figure(2)
        plot_metric(axes[0], data, y, x="step")
        plot_metric(axes[1], data, y, x="elapsed_s")
        paths[y] = save_figure(fig, out_dir, y)
    if any("drift_kl" in r for rows in data.values() for r in rows):
        # Drift from the store's policy (stage two, offline): what the trust region and warmup control.
        fig, axes = new_figure(4)
        for ax, y in zip(axes, ("drift_kl", "drift_ess", "drift_outside", "passes")):
            plot_metric(ax, data, y, x="step")
        paths["drift"] = save_figure(fig, out_dir, "drift")
    return paths


def write_benchmark(
    out_dir: str | Path,
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    x: str,
    ys: Sequence[str],
    title: str,
    ylabel: str,
    kind: str = "bar",
    logx: bool = False,
) -> tuple[Path, Path | None]:
    """A benchmark's table as ``NAME.csv`` plus a chart ``NAME.png`` beside it (bars, or lines over ``x``).

    Without matplotlib (e.g. a bare GPU machine) only the CSV is written and the chart is None.
    """
    import csv
    import importlib.util

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{name}.csv"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if importlib.util.find_spec("matplotlib") is None:
        return csv_path, None
    fig, ax = new_figure()
    labels = [str(row[x]) for row in rows]
    if kind == "line":
        for y in ys:
            ax.plot([row[x] for row in rows], [row[y] for row in rows], marker="o", label=y)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
    else:
        width = 0.8 / len(ys)
        for i, y in enumerate(ys):
            ax.bar([j + i * width for j in range(len(rows))], [row[y] for row in rows], width, label=y)
        ax.set_xticks(
            [j + width * (len(ys) - 1) / 2 for j in range(len(rows))], labels, rotation=15, ha="right"
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(ys) > 1 or kind == "line":
        ax.legend()
    return csv_path, save_figure(fig, out, name)


@dataclass
class StorePlotsConfig:
    store: str = field(metadata={"help": "store directory", "positional": True})
    out: str = field(metadata={"help": "directory for the PNG files"})
    bucket: int | None = field(default=None, metadata={"help": "positions per bucket (default: horizon/16)"})


@dataclass
class RunPlotsConfig:
    runs: list[str] = field(metadata={"help": "training run directories", "positional": True, "nargs": "+"})
    out: str = field(metadata={"help": "directory for the PNG files"})


def run(config: RunPlotsConfig, log=print) -> dict[str, Path]:
    """``lopd plot-runs``: training-run figures (PNG), one path printed per figure."""
    paths = run_figures(config.runs, config.out)
    for path in paths.values():
        log(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_opd.reporting.plots", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    add_dataclass_args(sub.add_parser("store", help="figures of one store"), StorePlotsConfig)
    add_dataclass_args(sub.add_parser("runs", help="figures of one or more training runs"), RunPlotsConfig)
    args = parser.parse_args(argv)
    try:
        if args.what == "store":
            config = config_from_args(StorePlotsConfig, args)
            paths = store_figures(config.store, config.out, bucket=config.bucket)
        else:
            config = config_from_args(RunPlotsConfig, args)
            paths = run_figures(config.runs, config.out)
    except LopdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
