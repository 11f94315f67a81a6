"""Store maintenance commands: inspect, verify, finalize, and derive/export/compare/index stores.

    lopd store inspect STORE_DIR [--json]       identity, sizes and rollout statistics (manifest only)
    lopd store inspect STORE_DIR --positions [--bucket N]
                                                per-position token count and mean teacher / behaviour /
                                                teacher-behaviour log-prob (streams the log-prob columns)
    lopd store verify STORE_DIR [--quick]       checksums, schema, identity and a row scan; exit 1 on problems
    lopd store finalize STORE_DIR [--num-shards N]
                                                after all `lopd precompute --shard-index i --num-shards N`
                                                workers finished: commit their parts into one manifest
    lopd store filter SRC --out DST [--finish-reasons stop] [--min-length N] [--max-length N]
                      [--min-reward R] [--drop-truncated] [--drop-repetitive] [--drop-empty]
                                                a NEW store of the rollouts that pass (lineage in the manifest)
    lopd store merge A B [C ...] --out DST      one NEW store from compatible scored stores
    lopd store compact SRC --out DST           a NEW store with 16-bit log-probs (format 1.2; error in the manifest;
                                               --topk-scale 32: also sorted top-k ids and coarser top-k, 1.3)
    lopd store export SRC --to hf|parquet DST   a Hugging Face datasets dir, or plain Parquet + manifest + README
    lopd store diff A B [--all] [--json]        what differs between two stores' manifests
    lopd store list [--cache DIR] [--json]      the store index (content id -> path); `register DIR` adds one
    lopd store plot STORE_DIR --out DIR         PNG figures: lengths, rates, per-position log-probs, advantage
    lopd store card STORE_DIR                   (re)write README.md, the dataset card (finalize writes it)

No tool rewrites a store in place: outputs must be new (or empty) directories outside the sources.
filter and merge refuse to write a store whose content id already exists elsewhere in the index
(`$LOPD_STORE_CACHE`, default ~/.cache/lightning-opd/stores) unless --allow-duplicate, and register it.

Without the `lopd` entry point: `python -m pipelines.store_tools verify STORE_DIR`.
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
from lightning_opd.store.reader import read_saved_header
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


@dataclass
class FilterConfig:
    store: str = _arg("source store directory")
    out: str = _opt("new store directory (must not exist or be empty)", REQUIRED)
    finish_reasons: list[str] | None = _opt(f"keep only these finish reasons {fmt.FINISH_REASONS}", nargs="+")
    min_length: int = _opt("keep responses of at least N tokens", 0)
    max_length: int | None = _opt("keep responses of at most N tokens")
    min_reward: float | None = _opt("keep rows with reward >= R (null dropped)")
    drop_truncated: bool = _opt("drop rollouts cut at the horizon", False)
    drop_repetitive: bool = _opt("drop repetitive rollouts (needs text)", False)
    drop_empty: bool = _opt("drop empty responses", False)
    cache: str | None = _opt(CACHE_HELP)
    allow_duplicate: bool = _opt(DUPLICATE_HELP, False)


@dataclass
class MergeConfig:
    stores: list[str] = _arg("source store directories (at least two)", nargs="+")
    out: str = _opt("new store directory (must not exist or be empty)", REQUIRED)
    cache: str | None = _opt(CACHE_HELP)
    allow_duplicate: bool = _opt(DUPLICATE_HELP, False)


@dataclass
class CompactConfig:
    store: str = _arg("source store directory")
    out: str = _opt("new store directory (must not exist or be empty)", REQUIRED)
    cache: str | None = _opt(CACHE_HELP)
    allow_duplicate: bool = _opt(DUPLICATE_HELP, False)
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
    saved = read_saved_header(root)
    writer = StoreWriter(
        root,
        saved["header"],
        num_parts=saved["num_parts"],
        topk=fmt.topk_of(saved["header"]),
        **_column_options(saved["columns"]),
    )
    # A person running this wants an answer now, not to queue behind active workers.
    manifest = writer.finalize(num_shards=config.num_shards, wait_s=0)
    print(
        f"finalized {root}: {len(manifest.shards)} shards, {manifest.stats.num_rollouts} rollouts, "
        f"{manifest.stats.num_response_tokens} response tokens, store_id {manifest.store_id[:12]}"
    )
    return 0


def _column_options(columns: list[str]) -> dict[str, bool]:
    return {
        "with_text": fmt.TEXT_COLUMN in columns,
        "with_reward": fmt.REWARD_COLUMN in columns,
        "with_sampling": fmt.SAMPLING_COLUMN in columns,
    }


def _finish_reasons(values: list[str] | None) -> tuple[str, ...]:
    # Accept both `--finish-reasons stop length` and `--finish-reasons stop,length`.
    if not values:
        return fmt.FINISH_REASONS
    return tuple(r for value in values for r in value.split(",") if r)


def run_filter(config: FilterConfig) -> int:
    spec = tools.FilterSpec(
        finish_reasons=_finish_reasons(config.finish_reasons),
        min_length=config.min_length,
        max_length=config.max_length,
        min_reward=config.min_reward,
        drop_truncated=config.drop_truncated,
        drop_repetitive=config.drop_repetitive,
        drop_empty=config.drop_empty,
    )
    with exclusive_output(config.out, _busy(config.out)):
        tools.filter_store(
            config.store, config.out, spec, cache_dir=config.cache, allow_duplicate=config.allow_duplicate
        )
    return 0


def run_merge(config: MergeConfig) -> int:
    with exclusive_output(config.out, _busy(config.out)):
        tools.merge_stores(
            config.stores, config.out, cache_dir=config.cache, allow_duplicate=config.allow_duplicate
        )
    return 0


def run_compact(config: CompactConfig) -> int:
    with exclusive_output(config.out, _busy(config.out)):
        tools.compact_store(
            config.store,
            config.out,
            cache_dir=config.cache,
            allow_duplicate=config.allow_duplicate,
            topk_scale=config.topk_scale or None,
        )
    return 0


def _busy(out: str) -> str:
    # Two derivations into one output at once: the second is refused instead of racing the first.
    return (
        f"another `lopd store` filter, merge or compact is writing {out} right now; wait for it to finish, "
        "or choose another --out"
    )


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
    from lightning_opd.plots import store_figures  # matplotlib/polars only for this command

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
