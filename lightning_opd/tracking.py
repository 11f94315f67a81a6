"""Experiment trackers (``--report-to``) through accelerate's trackers: TensorBoard, Weights & Biases,
MLflow. ``metrics.jsonl`` stays the source of truth; a tracker gets a copy of every row's numeric
fields (drift metrics included), under the same names, at the row's ``step``.

Where each one writes:

- tensorboard: ``OUT/<run name>/`` (event files; ``tensorboard --logdir OUT``);
- wandb: ``OUT/wandb/`` and the W&B project ``<run name>`` (``WANDB_MODE=offline`` to sync later);
- mlflow: wherever ``MLFLOW_TRACKING_URI`` points (experiment ``<run name>``, or
  ``MLFLOW_EXPERIMENT_NAME``), run name = the output directory's name.

The run config (the dataclass saved as config.json) is logged as the run's hyperparameters.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lightning_opd.config import check, json_safe, to_dict
from lightning_opd.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
REPORT_TO = ("none", *TRACKERS, "all")
# tracker -> (a module it needs, the pip command that installs it)
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow-skinny"),
}
EXTRA_HINT = "or all of them: pip install 'lightning-opd[trackers]'"
# What to do when a tracker's own start-up fails, by the package its exception comes from.
_START_HINTS = {
    "mlflow": "point MLFLOW_TRACKING_URI at your server or database (or set MLFLOW_ALLOW_FILE_STORE=true "
    "for a local file store)",
    "wandb": "log in (`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline and `wandb sync` later",
}


def check_report_to(value: str) -> None:
    check(value in REPORT_TO, f"report_to must be one of {' | '.join(REPORT_TO)}, got {value!r}")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[name][0]) is not None


def resolve_trackers(report_to: str) -> list[str]:
    """The trackers ``report_to`` names; ConfigError, with the pip command, when one is not installed.
    ``all`` is every installed one (at least one must be)."""
    check_report_to(report_to)
    if report_to == "none":
        return []
    if report_to == "all":
        found = [name for name in TRACKERS if _installed(name)]
        if not found:
            raise ConfigError(f"--report-to all: no tracker is installed; {EXTRA_HINT}")
        return found
    if not _installed(report_to):
        raise ConfigError(
            f"--report-to {report_to} needs the {_PACKAGES[report_to][0]} package: "
            f"{_PACKAGES[report_to][1]} ({EXTRA_HINT}), or pass --report-to none"
        )
    return [report_to]


def hyperparameters(config: Any) -> dict[str, bool | int | float | str]:
    """The run config as flat scalars: TensorBoard's hparams take only bool/int/float/str, MLflow
    stores strings anyway. Lists, dicts and None become their JSON text."""
    flat = {}
    for key, value in to_dict(config).items():
        keep = isinstance(value, (bool, int, float, str))
        flat[key] = value if keep else json.dumps(json_safe(value), sort_keys=True)
    return flat


def numeric_metrics(row: dict[str, Any]) -> dict[str, float | int]:
    """The fields of a metrics row that a tracker can plot: numbers (bools as 0/1), finite, not ``step``.
    The row is read as metrics.jsonl has it (non-finite values there are null, so not logged)."""
    out: dict[str, float | int] = {}
    for key, value in json_safe(row).items():
        if key == "step" or value is None or not isinstance(value, (bool, int, float)):
            continue
        out[key] = int(value) if isinstance(value, bool) else value
    return out


class RunTracker:
    """The trackers of one run; every method is a no-op with ``--report-to none``.

    Build it before the ``Accelerator`` (``accelerator_kwargs`` go into it), ``start`` it once the
    output directory is prepared, ``log`` every metrics row, ``finish`` at the end.
    """

    def __init__(self, report_to: str, out: str | Path, name: str, config: Any = None):
        self.trackers = resolve_trackers(report_to)  # fails before any work when a package is missing
        self.out, self.name, self.config = Path(out), name, config
        self.accelerator = None

    @classmethod
    def for_run(cls, config: Any, name: str) -> RunTracker:
        """From a stage config with ``report_to`` and ``out``."""
        return cls(config.report_to, config.out, name, config)

    def accelerator_kwargs(self) -> dict[str, Any]:
        if not self.trackers:
            return {}
        return {"log_with": list(self.trackers), "project_dir": str(self.out)}

    def start(self, accelerator) -> None:
        """``init_trackers`` with the run config as hyperparameters (main process only, by accelerate)."""
        if not self.trackers:
            return
        self.accelerator = accelerator
        init_kwargs = {
            "wandb": {"dir": str(self.out), "name": self.out.name},
            "mlflow": {"run_name": self.out.name},
        }
        config = hyperparameters(self.config) if self.config is not None else None
        try:
            accelerator.init_trackers(self.name, config=config, init_kwargs=init_kwargs)
        except Exception as e:
            package = type(e).__module__.split(".")[0]
            if package not in _START_HINTS:
                raise
            # The tracker's backend is the user's set-up (a server, a login, a store it may refuse).
            raise ConfigError(
                f"--report-to: {package} refused to start ({(str(e).splitlines() or [''])[0][:300]}); "
                f"{_START_HINTS[package]}, or pass --report-to none"
            ) from None

    def log(self, row: dict[str, Any]) -> None:
        if self.accelerator is not None:
            self.accelerator.log(numeric_metrics(row), step=int(row["step"]))

    def finish(self) -> None:
        """Flush and close the trackers. Not ``accelerator.end_training()``: that also destroys the
        process group, and the final model is still gathered collectively after the metrics end."""
        if self.accelerator is None:
            return
        if self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self.accelerator = None
