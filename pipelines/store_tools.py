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
    lopd store export SRC --to hf|parquet DST   a Hugging Face datasets dir, or plain Parquet + manifest + README
    lopd store diff A B [--all] [--json]        what differs between two stores' manifests
    lopd store list [--cache DIR] [--json]      the store index (content id -> path); `register DIR` adds one
    lopd store plot STORE_DIR --out DIR         PNG figures: lengths, rates, per-position log-probs, advantage

No tool rewrites a store in place: outputs must be new (or empty) directories outside the sources.
filter and merge refuse to write a store whose content id already exists elsewhere in the index
(`$LOPD_STORE_CACHE`, default ~/.cache/lightning-opd/stores) unless --allow-duplicate, and register it.

Without the `lopd` entry point: `python -m pipelines.store_tools verify STORE_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_opd.config import exclusive_output
from lightning_opd.errors import LopdError
from lightning_opd.store import registry, tools
from lightning_opd.store.summary import format_position_stats, position_stats, summarize_store
from lightning_opd.store.verify import verify_store, verify_summary
from lightning_opd.store.writer import StoreWriter, read_saved_header
from storage_schemas import logprob_store_v1 as fmt


def run_inspect(args: argparse.Namespace) -> int:
    if args.positions:
        rows = position_stats(args.store, args.bucket)
        print(json.dumps(rows, indent=2) if args.json else format_position_stats(rows))
        return 0
    if args.json:
        print(json.dumps(summarize_store(args.store), indent=2))
    else:
        summarize_store(args.store, out=sys.stdout)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    report = verify_store(args.store, deep=not args.quick)
    print(json.dumps(verify_summary(report), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def run_finalize(args: argparse.Namespace) -> int:
    root = Path(args.store)
    saved = read_saved_header(root)
    writer = StoreWriter(
        root,
        saved["header"],
        num_parts=saved["num_parts"],
        topk=fmt.topk_of(saved["header"]),
        **_column_options(saved["columns"]),
    )
    # A person running this wants an answer now, not to queue behind active workers.
    manifest = writer.finalize(num_shards=args.num_shards, wait_s=0)
    print(
        f"finalized {root}: {len(manifest.shards)} shards, {manifest.stats.num_rollouts} rollouts, "
        f"{manifest.stats.num_response_tokens} response tokens, store_id {manifest.store_id[:12]}"
    )
    return 0


def _column_options(columns: list[str]) -> dict[str, bool]:
    return {"with_text": fmt.TEXT_COLUMN in columns, "with_reward": fmt.REWARD_COLUMN in columns}


def _finish_reasons(values: list[str] | None) -> tuple[str, ...]:
    # Accept both `--finish-reasons stop length` and `--finish-reasons stop,length`.
    if not values:
        return fmt.FINISH_REASONS
    return tuple(r for value in values for r in value.split(",") if r)


def run_filter(args: argparse.Namespace) -> int:
    spec = tools.FilterSpec(
        finish_reasons=_finish_reasons(args.finish_reasons),
        min_length=args.min_length,
        max_length=args.max_length,
        min_reward=args.min_reward,
        drop_truncated=args.drop_truncated,
        drop_repetitive=args.drop_repetitive,
        drop_empty=args.drop_empty,
    )
    with exclusive_output(args.out, _busy(args.out)):
        tools.filter_store(
            args.store, args.out, spec, cache_dir=args.cache, allow_duplicate=args.allow_duplicate
        )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    with exclusive_output(args.out, _busy(args.out)):
        tools.merge_stores(args.stores, args.out, cache_dir=args.cache, allow_duplicate=args.allow_duplicate)
    return 0


def _busy(out: str) -> str:
    # Two derivations into one output at once: the second is refused instead of racing the first.
    return (
        f"another `lopd store` filter or merge is writing {out} right now; wait for it to finish, "
        "or choose another --out"
    )


def run_export(args: argparse.Namespace) -> int:
    export = tools.export_hf if args.to == "hf" else tools.export_parquet
    export(args.store, args.dst)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    rows = tools.diff_stores(args.a, args.b)
    if args.json:
        shown = [r for r in rows if args.all or not r.same]
        print(
            json.dumps(
                [{"field": r.field, "a": r.a, "b": r.b, "identity": r.identity} for r in shown], indent=2
            )
        )
    else:
        print(tools.format_diff(rows, args.a, args.b, show_all=args.all))
    return 0


def run_list(args: argparse.Namespace) -> int:
    entries = registry.list_stores(args.cache)
    if args.json:
        print(json.dumps([vars(e) for e in entries], indent=2))
    elif not entries:
        print(f"no stores registered in {registry.cache_dir_path(args.cache)}")
    else:
        print(registry.format_entries(entries))
    return 0


def run_register(args: argparse.Namespace) -> int:
    entry = registry.register(args.store, args.cache)
    print(
        f"registered {entry.path} as store_id {entry.store_id[:12]} in {registry.cache_dir_path(args.cache)}"
    )
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from lightning_opd.plots import store_figures  # matplotlib/polars only for this command

    for path in store_figures(args.store, args.out, bucket=args.bucket).values():
        print(path)
    return 0


def _add_cache_options(parser: argparse.ArgumentParser, *, duplicate: bool) -> None:
    parser.add_argument(
        "--cache",
        default=None,
        help=f"store index directory (default ${registry.CACHE_ENV} or {registry.DEFAULT_CACHE_DIR})",
    )
    if duplicate:
        parser.add_argument(
            "--allow-duplicate",
            action="store_true",
            help="write even if a store with the same content id exists",
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the store sub-commands (each sets ``func=run_*``, which returns the exit status)."""
    inspect = subparsers.add_parser("inspect", help="print a store's identity and statistics")
    inspect.add_argument("store", help="store directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument(
        "--positions", action="store_true", help="per-position statistics (reads the log-prob columns)"
    )
    inspect.add_argument(
        "--bucket", type=int, default=None, help="positions per bucket with --positions (default: horizon/16)"
    )
    inspect.set_defaults(func=run_inspect)

    verify = subparsers.add_parser("verify", help="check a store's shards and rows; exit 1 on problems")
    verify.add_argument("store", help="store directory")
    verify.add_argument(
        "--quick", action="store_true", help="skip the per-row scan (checksums still checked)"
    )
    verify.add_argument("--json", action="store_true", help="print JSON instead of text")
    verify.set_defaults(func=run_verify)

    finalize = subparsers.add_parser("finalize", help="commit all workers' parts into the manifest")
    finalize.add_argument("store", help="store directory")
    finalize.add_argument(
        "--num-shards", type=int, default=None, help="number of precompute workers (names the ones to rerun)"
    )
    finalize.set_defaults(func=run_finalize)

    _register_derived(subparsers)
    _register_index(subparsers)


def _register_derived(subparsers: argparse._SubParsersAction) -> None:
    filt = subparsers.add_parser("filter", help="write a new store of the rollouts that pass a filter")
    filt.add_argument("store", help="source store directory")
    filt.add_argument("--out", required=True, help="new store directory (must not exist or be empty)")
    filt.add_argument(
        "--finish-reasons",
        nargs="+",
        default=None,
        help=f"keep only these finish reasons {fmt.FINISH_REASONS}",
    )
    filt.add_argument("--min-length", type=int, default=0, help="keep responses of at least N tokens")
    filt.add_argument("--max-length", type=int, default=None, help="keep responses of at most N tokens")
    filt.add_argument(
        "--min-reward", type=float, default=None, help="keep rows with reward >= R (null dropped)"
    )
    filt.add_argument("--drop-truncated", action="store_true", help="drop rollouts cut at the horizon")
    filt.add_argument("--drop-repetitive", action="store_true", help="drop repetitive rollouts (needs text)")
    filt.add_argument("--drop-empty", action="store_true", help="drop empty responses")
    _add_cache_options(filt, duplicate=True)
    filt.set_defaults(func=run_filter)

    merge = subparsers.add_parser("merge", help="write a new store from several compatible scored stores")
    merge.add_argument("stores", nargs="+", help="source store directories (at least two)")
    merge.add_argument("--out", required=True, help="new store directory (must not exist or be empty)")
    _add_cache_options(merge, duplicate=True)
    merge.set_defaults(func=run_merge)

    export = subparsers.add_parser("export", help="export a store for other tools")
    export.add_argument("store", help="store directory")
    export.add_argument(
        "--to", required=True, choices=tools.EXPORT_FORMATS, help="hf: datasets dir; parquet: plain files"
    )
    export.add_argument("dst", help="output directory (must not exist or be empty)")
    export.set_defaults(func=run_export)

    diff = subparsers.add_parser("diff", help="what differs between two stores' manifests")
    diff.add_argument("a", help="first store directory")
    diff.add_argument("b", help="second store directory")
    diff.add_argument("--all", action="store_true", help="show equal fields too")
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diff.set_defaults(func=run_diff)


def _register_index(subparsers: argparse._SubParsersAction) -> None:
    listing = subparsers.add_parser("list", help="stores in the index (content id -> path)")
    _add_cache_options(listing, duplicate=False)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=run_list)

    reg = subparsers.add_parser("register", help="add a finalized store to the index")
    reg.add_argument("store", help="store directory")
    _add_cache_options(reg, duplicate=False)
    reg.set_defaults(func=run_register)

    plot = subparsers.add_parser("plot", help="PNG figures of a store")
    plot.add_argument("store", help="store directory")
    plot.add_argument("--out", required=True, help="directory for the PNG files")
    plot.add_argument("--bucket", type=int, default=None, help="positions per bucket (default: horizon/16)")
    plot.set_defaults(func=run_plot)


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
