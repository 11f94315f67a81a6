"""A finalized store is also a Hugging Face dataset: its README.md dataset card (issue 21)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import run_lopd

from lightning_opd.store import open_store, tools, verify_store
from lightning_opd.store.card import CARD_FILE, card_text
from storage_schemas import logprob_store_v1 as fmt


@pytest.fixture
def store_copy(micro_store, tmp_path):
    """A private copy of the session's store (with its _rollouts/, commits/ and locks/)."""
    return shutil.copytree(micro_store, tmp_path / "store")


def _rows_by_key(rows):
    return {(r["prompt_id"], r["sample_index"]): r for r in rows}


def test_finalize_writes_a_card_and_load_dataset_reads_the_store_as_lopd_does(store_copy, tmp_path):
    datasets = pytest.importorskip("datasets")
    assert (store_copy / CARD_FILE).is_file()
    assert (store_copy / fmt.ROLLOUTS_SUBDIR / "data").is_dir()  # another store's shards, not this one's
    # A temporary shard of an interrupted write: dot-prefixed, so the card's glob never sees it.
    (store_copy / "data" / ".part-000099.parquet.tmp-1").write_bytes(b"not parquet")
    ds = datasets.load_dataset(str(store_copy), cache_dir=str(tmp_path / "hf-cache"))
    store = open_store(store_copy)
    assert list(ds) == ["train"] and ds["train"].num_rows == store.num_rows
    theirs, ours = _rows_by_key(ds["train"]), _rows_by_key(store.iter_rows())
    assert theirs.keys() == ours.keys()
    key = sorted(ours)[0]
    assert theirs[key].keys() == ours[key].keys()
    for column, value in ours[key].items():
        if isinstance(value, (str, int, float)) or value is None:
            assert theirs[key][column] == value, column
        else:  # lists of ids and log-probs: the same numbers (float32 both ways)
            np.testing.assert_array_equal(np.asarray(theirs[key][column]), np.asarray(value), err_msg=column)
    assert ds["train"].features == datasets.Features.from_arrow_schema(store.manifest.schema())


def test_the_card_parses_as_a_hub_dataset_card(micro_store):
    from huggingface_hub import DatasetCard
    from huggingface_hub.repocard import metadata_load

    manifest = open_store(micro_store).manifest
    card = DatasetCard.load(micro_store / CARD_FILE)
    assert card.data.configs == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}
    ]
    features = card.data.dataset_info["features"]
    assert [f["name"] for f in features] == manifest.columns
    assert metadata_load(micro_store / CARD_FILE) == card.data.to_dict()
    for fact in (manifest.store_id, manifest.teacher["fingerprint"], manifest.student["fingerprint"],
                 f"{manifest.stats.num_rollouts:,} in", f"k={manifest.topk_k}", manifest.format_version,
                 "load_dataset", "scan_parquet", "duckdb", "open_store"):  # fmt: skip
        assert fact in card.text, fact


def test_derived_stores_get_a_card_whose_features_are_the_codes_of_a_compact_store(micro_store, tmp_path):
    datasets = pytest.importorskip("datasets")
    dst = tmp_path / "compact"
    tools.compact_store(micro_store, dst, topk_scale=32, allow_duplicate=True, log=lambda *_: None)
    manifest = open_store(dst).manifest
    text = (dst / CARD_FILE).read_text()
    assert "compact of" in text and "uint16 codes" in text and "16" in text
    from huggingface_hub import DatasetCard

    declared = datasets.Features._from_yaml_list(
        DatasetCard.load(dst / CARD_FILE).data.dataset_info["features"]
    )
    assert declared == datasets.Features.from_arrow_schema(manifest.schema())
    assert declared["teacher_logprobs"].feature.dtype == "uint16"


def test_store_card_regenerates_a_deleted_card_and_verify_accepts_the_card(store_copy):
    before = (store_copy / CARD_FILE).read_text()
    report = verify_store(store_copy)
    assert report.ok and not report.warnings, report.format()
    (store_copy / CARD_FILE).unlink()
    result = run_lopd("store", "card", store_copy)
    assert "wrote" in result.stdout and (store_copy / CARD_FILE).read_text() == before
    assert card_text(open_store(store_copy).manifest) == before
    result = run_lopd("store", "verify", store_copy)
    assert "OK" in result.stdout and "README" not in result.stdout


def test_store_card_refuses_a_directory_that_is_no_store(tmp_path):
    result = run_lopd("store", "card", tmp_path, check=False)
    assert result.returncode == 2 and "not a logprob store" in result.stderr
    assert not (tmp_path / CARD_FILE).exists()
