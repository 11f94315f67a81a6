"""Helpers shared by the per-stage dataclass configs: validation, JSON save/load, run directories.

Each stage owns one dataclass config. It is validated on construction (``__post_init__``) and saved
as ``config.json`` beside the stage's outputs, so every artefact says how it was made.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning_opd.errors import ConfigError, OutputExistsError
from lightning_opd.flag_help import CHOICES, HELP

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


# Saved configs are versioned. Every field added to a config gets a default that reproduces the
# behaviour from before it existed, so a field missing from a saved config reads as its default: a run
# started before the field was added still resumes (and is still "the same run"). A change that a
# default cannot express (a field renamed, a meaning changed) bumps CONFIG_VERSION and adds the step
# that converts the older form to CONFIG_UPGRADES. A config written by a newer version is refused.
CONFIG_VERSION_KEY = "lopd_config_version"
CONFIG_VERSION = 2  # 1: written before configs carried a version (lightning-opd up to 2026-12-06)
CONFIG_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: lambda saved: saved,  # 1 -> 2: only fields with defaults were added
}


def upgrade_saved_config(saved: dict[str, Any], config: Any, where: str) -> dict[str, Any]:
    """A saved config (``config.json``) in the current form of ``config``'s class: upgraded from its
    version, missing fields read as their defaults. OutputExistsError when it cannot be read as one."""
    data = dict(saved)
    version = data.pop(CONFIG_VERSION_KEY, 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise OutputExistsError(
            f"{where} has an invalid {CONFIG_VERSION_KEY} {version!r}; choose a new output directory"
        )
    if version > CONFIG_VERSION:
        raise OutputExistsError(
            f"{where} was written by a newer lightning-opd (config version {version}, this one reads up "
            f"to {CONFIG_VERSION}); upgrade lightning-opd (pip install -U lightning-opd) to resume it"
        )
    for step in range(version, CONFIG_VERSION):
        data = CONFIG_UPGRADES[step](data)
    defaults = field_defaults(type(config))
    return {**{k: v for k, v in defaults.items() if k not in data}, **data}


def field_defaults(cls: type) -> dict[str, Any]:
    """The default of every field of a dataclass that has one, as ``to_dict`` writes it."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default_factory())
    return out


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config from a dict, warning about (and ignoring) keys this version does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k != CONFIG_VERSION_KEY}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=2)
    return cls(**{k: v for k, v in data.items() if k in names})


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float as None: bare ``NaN``/``Infinity`` are not JSON, and strict
    parsers (JavaScript, DuckDB's read_json, most libraries) refuse the file (an undefined interval of
    one seed, a skipped step's gradient norm)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file, fsync and rename, so a crash never leaves half a file.
    Strict JSON: non-finite floats are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(json_safe(data), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_config(config: Any, out_dir: str | Path, name: str = "config.json") -> Path:
    path = Path(out_dir) / name
    write_json_atomic(path, {**to_dict(config), CONFIG_VERSION_KEY: CONFIG_VERSION})
    return path


def prepare_output_dir(
    out_dir: str | Path,
    config: Any,
    *,
    overwrite: bool = False,
    name: str = "config.json",
    ignore: frozenset = frozenset(),
) -> Path:
    """Create ``out_dir`` for a run of ``config``.

    An existing directory is accepted when it holds the *same* config (a resume) or is empty; one
    that holds a different run is refused unless ``overwrite`` is set, so no result is lost silently.
    Fields in ``ignore`` (and ``overwrite`` itself) may differ: e.g. the shard index of workers that
    fill one store together, or the step count of a resumed training run.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"--out {out} exists and is a file, not a directory; choose a new output directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputExistsError(
            f"cannot create --out {out} ({e.strerror}); choose a writable directory"
        ) from None
    # Two runs started into one directory at once: the second sees the first's config.json.
    with _directory_lock(out):
        return _prepare_locked(out, config, overwrite=overwrite, name=name, ignore=ignore)


@contextlib.contextmanager
def _directory_lock(path: Path):
    """An exclusive flock on the directory itself (no lock file to leave behind)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_output(path: str | Path, busy_message: str):
    """Be the only process writing the output directory ``path`` (created if missing) while the block runs.

    A second process is refused at once with OutputExistsError(busy_message) instead of racing the
    first part by part. Directories created here and still empty when the block fails are removed.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        yield  # not a directory: the command's own checks refuse it with their message
        return
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputExistsError(f"cannot create {out} ({e.strerror}); choose a writable directory") from None
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(busy_message) from None
        yield
    except BaseException:
        for made in created:
            if not (made.is_dir() and not any(made.iterdir())):
                break
            made.rmdir()
        raise
    finally:
        os.close(fd)


def _prepare_locked(out: Path, config: Any, *, overwrite: bool, name: str, ignore: frozenset) -> Path:
    saved = out / name
    if any(out.iterdir()) and not overwrite:
        if not saved.exists():
            raise OutputExistsError(
                f"{out} is not empty and holds no {name} from lightning-opd; choose a new output "
                "directory or pass --overwrite"
            )
        try:
            previous = json.loads(saved.read_text())
        except (OSError, ValueError) as e:
            raise OutputExistsError(
                f"{saved} is unreadable or not JSON ({e}); choose a new output directory or pass --overwrite"
            ) from None
        if not isinstance(previous, dict):
            raise OutputExistsError(f"{saved} is not a lightning-opd config; choose a new output directory")
        version = previous.get(CONFIG_VERSION_KEY, 1)
        previous = upgrade_saved_config(previous, config, str(saved))
        if version != CONFIG_VERSION:  # keep what the run was started with, as it was written
            kept = saved.with_name(f"{saved.stem}.v{version}{saved.suffix}")
            if not kept.exists():
                shutil.copy2(saved, kept)
        current = to_dict(config)
        skip = set(ignore) | {"overwrite"}
        gone = sorted(set(previous) - set(current) - skip)
        if gone:
            raise OutputExistsError(
                f"{saved} holds fields {gone} that this lightning-opd's {type(config).__name__} no longer has; "
                "resume it with the version that wrote it, or choose a new output directory"
            )
        differing = sorted(k for k in current if k not in skip and previous.get(k) != current.get(k))
        if differing:
            raise OutputExistsError(
                f"{out} already holds a different run (config differs in {differing}); choose a new "
                "output directory, or pass --overwrite to replace it"
            )
    try:
        save_config(config, out, name)
    except OSError as e:
        raise OutputExistsError(
            f"cannot write to --out {out} ({e.strerror}); choose a writable directory"
        ) from None
    return out


def parse_number_list(text: str, kind: type, flag: str, *, minimum: float | None = None) -> list:
    """``"1,4,8"`` -> ``[1, 4, 8]`` for a comma-separated flag; ConfigError naming the flag otherwise."""
    values = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        try:
            value = kind(item)
        except ValueError:
            raise ConfigError(
                f"{flag} must be comma-separated {kind.__name__}s (e.g. 1,4), got {text!r}"
            ) from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ConfigError(f"{flag} values must be finite{bound}, got {item!r} in {text!r}")
        values.append(value)
    return values


def check_writable_file(path: str | Path, flag: str) -> None:
    """Fail before any work when ``path`` cannot be written as a file (a directory, an unwritable place)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass a file path such as {path / 'result.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be written ({parent} is not a writable directory)")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is not writable; choose another path")


def add_dataclass_args(parser, cls) -> None:
    """One ``--flag`` per field of a flat dataclass config (help from ``field(metadata={"help": ...})``).

    The config stays the single source of truth: defaults, types and help text live on the dataclass,
    the command line only mirrors them. Field metadata may also say ``positional`` (an argument
    without ``--``), ``nargs`` (e.g. ``"+"`` for a list) and ``choices``.
    """
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        # argparse %-formats help strings (for %(default)s): a literal "95%" would crash --help.
        helptext = (f.metadata.get("help") or HELP.get(f.name, "")).replace("%", "%%")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        extra = {k: f.metadata[k] for k in ("nargs", "choices") if k in f.metadata}
        if "choices" not in extra and default in CHOICES.get(f.name, ()):
            extra["choices"] = CHOICES[f.name]  # a typo refused at once, with the list
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=_field_type(f, default), help=helptext, **extra)
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=helptext)
            continue
        kind = _field_type(f, default)
        if not required and "(default" not in helptext:  # a required flag has none; never two
            helptext = f"{helptext} (default: {str(default).replace('%', '%%')})"
        parser.add_argument(flag, type=kind, default=default, required=required, help=helptext, **extra)


def _field_type(f, default):
    text = str(f.type)
    if default is not None:
        return type(default) if not isinstance(default, (list, tuple)) else str
    if "int" in text and "str" not in text and "float" not in text:
        return int
    if "float" in text and "str" not in text:
        return float
    return str


def config_from_args(cls: type[T], args) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def config_to_argv(config) -> list[str]:
    """The command-line flags that ``add_dataclass_args`` + ``config_from_args`` turn back into
    ``config`` (for starting the same job in another process). None values are left to their default."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("positional"):
            argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        elif isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
