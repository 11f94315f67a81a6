"""Store maintenance commands: inspect, verify and finalize a logprob store.

    lopd store inspect STORE_DIR [--json]       identity, sizes and rollout statistics (manifest only)
    lopd store verify STORE_DIR [--quick]       checksums, schema, identity and a row scan; exit 1 on problems
    lopd store finalize STORE_DIR [--num-shards N]
                                                after all `lopd precompute --shard-index i --num-shards N`
                                                workers finished: commit their parts into one manifest

Without the `lopd` entry point: `python -m pipelines.store_tools verify STORE_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lightning_opd.errors import LopdError
from lightning_opd.store.summary import summarize_store
from lightning_opd.store.verify import verify_store, verify_summary
from lightning_opd.store.writer import StoreWriter, read_saved_header
from storage_schemas import logprob_store_v1 as fmt


def run_inspect(args: argparse.Namespace) -> int:
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect``, ``verify`` and ``finalize`` sub-commands (each sets ``func=run_*``)."""
    inspect = subparsers.add_parser("inspect", help="print a store's identity and statistics")
    inspect.add_argument("store", help="store directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
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
