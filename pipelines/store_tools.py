"""Store maintenance commands, ``lopd store COMMAND`` (``lopd store COMMAND --help`` for the flags):

    inspect / verify / diff / list / plot       read stores (verify: checksums, schema, identity, rows)
    finalize                                    commit the parts of all `--shard-index i` workers
    filter / merge / compact                    write a NEW store derived from others (lineage kept)
    export / register / card                    hand a store to other tools, the index, the Hub

No tool rewrites a store in place: outputs must be new (or empty) directories outside the sources.
filter, merge and compact refuse to write a store whose content id already exists elsewhere in the
index (`$LOPD_STORE_CACHE`, default ~/.cache/lightning-opd/stores) unless --allow-duplicate, and
register it. Without the `lopd` entry point: `python -m pipelines.store_tools verify STORE_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning_opd.config import add_dataclass_args, config_from_args, exclusive_output
from lightning_opd.errors import LopdError
from lightning_opd.store import registry, tools
from lightning_opd.store.summary import format_position_stats, position_stats, summarize_store
from lightning_opd.store.verify import verify_store, verify_summary
from lightning_opd.store.writer import StoreWriter
from storage_schemas import logprob_store_v1 as fmt

REQUIRED = object()  # the default of a required --flag


def _arg(helptext: str, **extra):
    """A positional argument (``extra`` may give nargs)."""
    return field(metadata={"help": helptext, "positional": True, **extra})


def _opt(helptext: str, default=None, **extra):
    """A ``--flag``; ``REQUIRED`` as the default makes it required."""
    if default is REQUIRED:
        return field(metadata={"help": helptext, **extra})
    return field(default=default, metadata={"help": helptext, **extra})


CACHE_HELP = f"store index directory (default ${registry.CACHE_ENV} or {registry.DEFAULT_CACHE_DIR})"
DUPLICATE_HELP = "write even if a store with the same content id exists"


@dataclass
class InspectConfig:
    store: str = _arg("store directory")
    json: bool = _opt("print JSON instead of a table", False)
    positions: bool = _opt("per-position statistics (reads the log-prob columns)", False)
    bucket: int | None = _opt("positions per bucket with --positions (default: horizon/16)")


@dataclass
class VerifyConfig:
    store: str = _arg("store directory")
    quick: bool = _opt("skip the per-row scan (checksums still checked)", False)
    json: bool = _opt("print JSON instead of text", False)


@dataclass
class FinalizeConfig:
    store: str = _arg("store directory")
    num_shards: int | None = _opt("number of precompute workers (names the ones to rerun)")


@dataclass(kw_only=True)
class DerivedOutput:
    """Where filter, merge and compact write their new store, and the content-id index it joins."""

    out: str = _opt("new store directory (must not exist or be empty)", REQUIRED)
    cache: str | None = _opt(CACHE_HELP)
    allow_duplicate: bool = _opt(DUPLICATE_HELP, False)


@dataclass
class FilterConfig(DerivedOutput):
    store: str = _arg("source store directory")
    finish_reasons: list[str] | None = _opt(f"keep only these finish reasons {fmt.FINISH_REASONS}", nargs="+")
    min_length: int = _opt("keep responses of at least N tokens", 0)
    max_length: int | None = _opt("keep responses of at most N tokens")
    min_reward: float | None = _opt("keep rows with reward >= R (null dropped)")
    drop_truncated: bool = _opt("drop rollouts cut at the horizon", False)
    drop_repetitive: bool = _opt("drop repetitive rollouts (needs text)", False)
    drop_empty: bool = _opt("drop empty responses", False)


@dataclass
class MergeConfig(DerivedOutput):
    stores: list[str] = _arg("source store directories (at least two)", nargs="+")


@dataclass
class CompactConfig(DerivedOutput):
    store: str = _arg("source store directory")
    topk_scale: int = _opt(
        "also compact the top-k (format 1.3): ids sorted and stored as gaps, top-k log-probs in steps of "
        f"1/N nats (error <= 1/(2N)); N a power of two, e.g. {fmt.SUGGESTED_TOPK_SCALE}; 0 = keep 1.2's top-k",
        0,
    )


@dataclass
class ExportConfig:
    store: str = _arg("store directory")
    dst: str = _arg("output directory (must not exist or be empty)")
    to: str = _opt("hf: datasets dir; parquet: plain files", REQUIRED, choices=tools.EXPORT_FORMATS)


@dataclass
class DiffConfig:
    a: str = _arg("first store directory")
    b: str = _arg("second store directory")
    all: bool = _opt("show equal fields too", False)
    json: bool = _opt("print JSON instead of a table", False)


@dataclass
class ListConfig:
    cache: str | None = _opt(CACHE_HELP)
    json: bool = _opt("print JSON instead of a table", False)


@dataclass
class RegisterConfig:
    store: str = _arg("store directory")
    cache: str | None = _opt(CACHE_HELP)


@dataclass
class CardConfig:
    store: str = _arg("finalized store directory")


@dataclass
class PlotConfig:
    store: str = _arg("store directory")
    out: str = _opt("directory for the PNG files", REQUIRED)
    bucket: int | None = _opt("positions per bucket (default: horizon/16)")


def run_inspect(config: InspectConfig) -> int:
    if config.positions:
        rows = position_stats(config.store, config.bucket)
        print(json.dumps(rows, indent=2) if config.json else format_position_stats(rows))
        return 0
    if config.json:
        print(json.dumps(summarize_store(config.store), indent=2))
    else:
        summarize_store(config.store, out=sys.stdout)
    return 0


def run_verify(config: VerifyConfig) -> int:
    report = verify_store(config.store, deep=not config.quick)
    print(json.dumps(verify_summary(report), indent=2) if config.json else report.format())
    return 0 if report.ok else 1


def run_finalize(config: FinalizeConfig) -> int:
    root = Path(config.store)
    # A person running this wants an answer now, not to queue behind active workers.
    manifest = StoreWriter.reopen(root).finalize(num_shards=config.num_shards, wait_s=0)
    print(
        f"finalized {root}: {len(manifest.shards)} shards, {manifest.stats.num_rollouts} rollouts, "
        f"{manifest.stats.num_response_tokens} response tokens, store_id {manifest.store_id[:12]}"
    )
    return 0


def run_filter(config: FilterConfig) -> int:
    spec = tools.FilterSpec(
        finish_reasons=tools.finish_reasons_from_flags(config.finish_reasons),
        min_length=config.min_length,
        max_length=config.max_length,
        min_reward=config.min_reward,
        drop_truncated=config.drop_truncated,
        drop_repetitive=config.drop_repetitive,
        drop_empty=config.drop_empty,
    )
    return _derive(config, lambda **kw: tools.filter_store(config.store, config.out, spec, **kw))


def run_merge(config: MergeConfig) -> int:
    return _derive(config, lambda **kw: tools.merge_stores(config.stores, config.out, **kw))


def run_compact(config: CompactConfig) -> int:
    scale = config.topk_scale or None
    return _derive(config, lambda **kw: tools.compact_store(config.store, config.out, topk_scale=scale, **kw))


def _derive(config: DerivedOutput, write) -> int:
    """Run ``write(cache_dir=, allow_duplicate=)`` as the only writer of ``config.out``: a second filter,
    merge or compact into the same output at once is refused instead of racing the first."""
    busy = (
        f"another `lopd store` filter, merge or compact is writing {config.out} right now; wait for it to "
        "finish, or choose another --out"
    )
    with exclusive_output(config.out, busy):
        write(cache_dir=config.cache, allow_duplicate=config.allow_duplicate)
    return 0


def run_export(config: ExportConfig) -> int:
    export = tools.export_hf if config.to == "hf" else tools.export_parquet
    export(config.store, config.dst)
    return 0


def run_diff(config: DiffConfig) -> int:
    rows = tools.diff_stores(config.a, config.b)
    if config.json:
        shown = [r for r in rows if config.all or not r.same]
        print(
            json.dumps(
                [{"field": r.field, "a": r.a, "b": r.b, "identity": r.identity} for r in shown], indent=2
            )
        )
    else:
        print(tools.format_diff(rows, config.a, config.b, show_all=config.all))
    return 0


def run_list(config: ListConfig) -> int:
    entries = registry.list_stores(config.cache)
    if config.json:
        print(json.dumps([vars(e) for e in entries], indent=2))
    elif not entries:
        print(f"no stores registered in {registry.cache_dir_path(config.cache)}")
    else:
        print(registry.format_entries(entries))
    return 0


def run_register(config: RegisterConfig) -> int:
    entry = registry.register(config.store, config.cache)
    print(
        f"registered {entry.path} as store_id {entry.store_id[:12]} in {registry.cache_dir_path(config.cache)}"
    )
    return 0


def run_plot(config: PlotConfig) -> int:
    from lightning_opd.reporting.plots import store_figures  # matplotlib/polars only for this command

    for path in store_figures(config.store, config.out, bucket=config.bucket).values():
        print(path)
    return 0


def run_card(config: CardConfig) -> int:
    print(f"wrote {tools.write_card(config.store)} (datasets.load_dataset({config.store!r}) reads the store)")
    return 0


# sub-command -> (config, run, one-line help); each run returns the exit status.
COMMANDS = {
    "inspect": (InspectConfig, run_inspect, "print a store's identity and statistics"),
    "verify": (VerifyConfig, run_verify, "check a store's shards and rows; exit 1 on problems"),
    "finalize": (FinalizeConfig, run_finalize, "commit all workers' parts into the manifest"),
    "filter": (FilterConfig, run_filter, "write a new store of the rollouts that pass a filter"),
    "merge": (MergeConfig, run_merge, "write a new store from several compatible scored stores"),
    "compact": (CompactConfig, run_compact, "write a new store with 16-bit log-probs (smaller)"),
    "export": (ExportConfig, run_export, "export a store for other tools"),
    "diff": (DiffConfig, run_diff, "what differs between two stores' manifests"),
    "list": (ListConfig, run_list, "stores in the index (content id -> path)"),
    "register": (RegisterConfig, run_register, "add a finalized store to the index"),
    "plot": (PlotConfig, run_plot, "PNG figures of a store"),
    "card": (CardConfig, run_card, "write the store's dataset card (README.md) for datasets and the Hub"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the store sub-commands, flags generated from their configs (``func`` returns the exit status)."""
    for name, (config_cls, run, helptext) in COMMANDS.items():
        parser = subparsers.add_parser(name, help=helptext, description=helptext)
        add_dataclass_args(parser, config_cls)
        parser.set_defaults(func=lambda args, c=config_cls, r=run: r(config_from_args(c, args)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="store_tools", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LopdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
