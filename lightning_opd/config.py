"""Helpers shared by the per-stage dataclass configs: validation, JSON save/load, run directories.

Each stage owns one dataclass config. It is validated on construction (``__post_init__``) and saved
as ``config.json`` beside the stage's outputs, so every artefact says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, TypeVar

from lightning_opd.errors import ConfigError, OutputExistsError

T = TypeVar("T")


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds; messages should quote the bad value."""
    if not condition:
        raise ConfigError(message)


def to_dict(config: Any) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config from a dict, warning about (and ignoring) keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=2)
    return cls(**{k: v for k, v in data.items() if k in names})


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file, fsync and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_config(config: Any, out_dir: str | Path, name: str = "config.json") -> Path:
    path = Path(out_dir) / name
    write_json_atomic(path, to_dict(config))
    return path


def prepare_output_dir(out_dir: str | Path, config: Any, *, overwrite: bool = False, name: str = "config.json") -> Path:
    """Create ``out_dir`` for a run of ``config``.

    An existing directory is accepted when it holds the *same* config (a resume) or is empty; one
    that holds a different run is refused unless ``overwrite`` is set, so no result is lost silently.
    """
    out = Path(out_dir)
    saved = out / name
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not saved.exists():
            raise OutputExistsError(
                f"{out} is not empty and holds no {name} from lightning-opd; choose a new output "
                "directory or pass --overwrite"
            )
        previous = json.loads(saved.read_text())
        current = to_dict(config)
        differing = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if differing:
            raise OutputExistsError(
                f"{out} already holds a different run (config differs in {differing}); choose a new "
                "output directory, or pass --overwrite to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out, name)
    return out
