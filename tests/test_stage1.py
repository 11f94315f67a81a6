"""Stage one end to end: rollouts + teacher scoring into a store, pinned against naive references."""

import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import precompute_config, run_lopd
from transformers import AutoModelForCausalLM

from lightning_opd.errors import StoreError, TeacherConsistencyError, TokenizerMismatchError
from lightning_opd.models.fingerprint import model_fingerprint
from lightning_opd.stage1 import build
from lightning_opd.store import open_store, verify_store
from pipelines import precompute

QUIET = dict(log=lambda *_: None)


def store_rows(root):
    store = open_store(root)
    rows = [r for batch in store.iter_batches() for r in batch.to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"]))


def naive_logprobs(model_dir, prompt, response):
    """log softmax over the full vocabulary of one unbatched forward: the reference for scoring."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float()[0], -1)
    positions = range(len(prompt) - 1, len(prompt) + len(response) - 1)
    return np.array([logp[p, ids[0, p + 1]].item() for p in positions]), logp[
        len(prompt) - 1 : len(prompt) + len(response) - 1
    ]


def test_store_matches_naive_scoring(micro_store, sft_student_dir, micro_teacher_dir):
    rows = store_rows(micro_store)
    assert len(rows) == 10
    for row in rows[:4]:
        teacher_ref, teacher_full = naive_logprobs(micro_teacher_dir, row["prompt_ids"], row["response_ids"])
        np.testing.assert_allclose(row["teacher_logprobs"], teacher_ref, atol=1e-4)
        behavior_ref, _ = naive_logprobs(sft_student_dir, row["prompt_ids"], row["response_ids"])
        np.testing.assert_allclose(row["behavior_logprobs"], behavior_ref, atol=1e-4)
        top = torch.topk(teacher_full, 3, dim=-1)
        np.testing.assert_allclose(np.array(row["teacher_topk_logprobs"]), top.values.numpy(), atol=1e-4)
        assert np.array(row["teacher_topk_ids"]).tolist() == top.indices.tolist()


def test_manifest_records_identity_and_stats(micro_store, sft_student_dir, micro_teacher_dir, opd_prompts):
    manifest = open_store(micro_store).manifest
    assert manifest.teacher["fingerprint"] == model_fingerprint(micro_teacher_dir)
    assert manifest.student["fingerprint"] == model_fingerprint(sft_student_dir)
    assert manifest.student["sft_teacher_fingerprint"] == manifest.teacher["fingerprint"]
    assert manifest.teacher_consistency["consistent"] is True
    assert manifest.horizon == 8 and manifest.sampling["backend"] == "transformers"
    assert manifest.sampling["behavior_logprobs"]
    assert manifest.topk["k"] == 3 and manifest.topk["tail_treatment"] == "renormalize"
    assert manifest.prompt_set["num_prompts"] == 10 and manifest.prompt_set["content_hash"].startswith("ps1:")
    assert manifest.stats.num_rollouts == 10 and 0 <= manifest.stats.trunc_rate <= 1
    assert len(manifest.shards) == 3  # 10 prompts in parts of 4
    assert verify_store(micro_store).ok


def test_cli_precompute_inspect_verify(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    out = tmp_path / "store"
    run_lopd(
        "rollout",
        "--student",
        sft_student_dir,
        "--prompts",
        opd_prompts,
        "--out",
        tmp_path / "rollouts",
        "--max-new-tokens",
        6,
        "--part-size",
        5,
        "--backend",
        "transformers",
    )
    assert open_store(tmp_path / "rollouts").kind == "rollouts"
    run_lopd("score", "--rollouts", tmp_path / "rollouts", "--teacher", micro_teacher_dir, "--out", out)
    assert "OK" in run_lopd("store", "verify", out).stdout
    inspect = run_lopd("store", "inspect", out).stdout
    assert "rows" in inspect and "10" in inspect
    assert open_store(out).kind == "scored"


def test_resume_after_crash_reproduces_the_store(
    tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts, monkeypatch
):
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "clean"), **QUIET
    )
    from lightning_opd.store import StoreWriter

    real_write = StoreWriter.write_part
    calls = {"n": 0}

    def crashing_write(self, part, rows):
        calls["n"] += 1
        if self.kind == "scored" and calls["n"] > 4:  # 3 rollout parts, then 1 scored part, then crash
            raise RuntimeError("injected crash")
        return real_write(self, part, rows)

    monkeypatch.setattr(StoreWriter, "write_part", crashing_write)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):
        precompute.run(
            precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, crashed, allow_duplicate=True),
            **QUIET,
        )
    assert not (crashed / "manifest.json").exists()
    monkeypatch.setattr(StoreWriter, "write_part", real_write)
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, crashed, allow_duplicate=True),
        **QUIET,
    )
    assert store_rows(crashed) == store_rows(tmp_path / "clean")


def test_sharded_runs_merge_to_the_same_store(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "single"), **QUIET
    )
    sharded = tmp_path / "sharded"
    for index in (1, 0):
        precompute.run(
            precompute_config(
                sft_student_dir,
                micro_teacher_dir,
                opd_prompts,
                sharded,
                shard_index=index,
                num_shards=2,
                allow_duplicate=True,
            ),
            **QUIET,
        )
    # The last worker to finish commits the manifest itself; `lopd store finalize` is then a no-op.
    run_lopd("store", "finalize", sharded)
    assert store_rows(sharded) == store_rows(tmp_path / "single")
    assert verify_store(sharded).ok


def test_partial_shards_are_not_a_store(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    out = tmp_path / "half"
    precompute.run(
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, out, shard_index=0, num_shards=2),
        **QUIET,
    )
    assert not (out / "manifest.json").exists()
    result = run_lopd("store", "finalize", out, check=False)
    assert result.returncode != 0 and "not committed" in result.stderr and "parts 1" in result.stderr


def test_teacher_consistency_gate(tmp_path, sft_student_dir, micro_student_dir, opd_prompts):
    # The student's SFT teacher is the micro teacher; scoring with another model is refused, naming both.
    other_teacher = micro_student_dir
    with pytest.raises(TeacherConsistencyError) as err:
        precompute.run(
            precompute_config(sft_student_dir, other_teacher, opd_prompts, tmp_path / "a"), **QUIET
        )
    assert model_fingerprint(other_teacher) in str(err.value) and "--allow-inconsistent-teacher" in str(
        err.value
    )
    assert not (tmp_path / "a" / "manifest.json").exists()
    precompute.run(
        precompute_config(
            sft_student_dir, other_teacher, opd_prompts, tmp_path / "b", allow_inconsistent_teacher=True
        ),
        **QUIET,
    )
    record = open_store(tmp_path / "b").manifest.teacher_consistency
    assert record["consistent"] is False and record["allowed"] is True and record["note"]


def test_student_without_provenance_warns_and_can_declare(
    tmp_path, micro_student_dir, micro_teacher_dir, opd_prompts
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precompute.run(
            precompute_config(micro_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "a"), **QUIET
        )
    assert any("no provenance" in str(w.message) for w in caught)
    assert open_store(tmp_path / "a").manifest.teacher_consistency["consistent"] is None
    precompute.run(
        precompute_config(
            micro_student_dir,
            micro_teacher_dir,
            opd_prompts,
            tmp_path / "b",
            sft_teacher=str(micro_teacher_dir),
            allow_duplicate=True,  # the same rows as "a": only the consistency record differs,
        ),
        **QUIET,
    )
    assert open_store(tmp_path / "b").manifest.teacher_consistency["consistent"] is True


def test_tokenizer_mismatch_is_found_before_any_work(
    tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts
):
    from lightning_opd.toy.tokenizer import build_char_tokenizer

    foreign = tmp_path / "foreign_teacher"
    AutoModelForCausalLM.from_pretrained(micro_teacher_dir).save_pretrained(foreign)
    tok = build_char_tokenizer()
    tok.add_tokens(["<tool>"])
    tok.save_pretrained(foreign)
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        precompute.run(
            precompute_config(
                sft_student_dir, foreign, opd_prompts, tmp_path / "s", allow_inconsistent_teacher=True
            ),
            **QUIET,
        )


def test_prompts_longer_than_the_context_are_skipped_and_counted(
    tmp_path, sft_student_dir, micro_teacher_dir
):
    from lightning_opd.prompts import write_jsonl

    context = json.loads((sft_student_dir / "config.json").read_text())["max_position_embeddings"]
    rows = [{"prompt_id": "ok", "prompt": "1+2="}, {"prompt_id": "long", "prompt": "1" * (context + 5)}]
    write_jsonl(rows, tmp_path / "p.jsonl")
    with pytest.warns(UserWarning, match="skipped 1 of 2 prompts"):
        precompute.run(
            precompute_config(sft_student_dir, micro_teacher_dir, tmp_path / "p.jsonl", tmp_path / "s"),
            **QUIET,
        )
    store = open_store(tmp_path / "s")
    assert store.num_rows == 1 and store.manifest.prompt_set["skipped_prompts"] == 1


def test_nan_teacher_logprobs_are_refused_and_nothing_is_committed(
    tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts, monkeypatch
):
    real = build.score_sequences

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0].logprobs[0] = np.nan
        return out

    monkeypatch.setattr(build, "score_sequences", poisoned)
    with pytest.raises(StoreError, match="(?i)nan|finite"):
        precompute.run(
            precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "s"), **QUIET
        )
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not list((tmp_path / "s" / "data").glob("*.parquet"))


def test_interop_polars_duckdb_datasets(micro_store):
    import duckdb
    import polars as pl
    from datasets import load_dataset

    pattern = str(micro_store / "data" / "*.parquet")
    frame = pl.scan_parquet(pattern).select("prompt_id", "teacher_logprobs").collect()
    count = duckdb.sql(f"select count(*) from read_parquet('{pattern}')").fetchall()[0][0]
    dataset = load_dataset("parquet", data_files=pattern, split="train")
    assert len(frame) == count == len(dataset) == 10
    assert str(
        pq.read_schema(next((micro_store / "data").glob("*.parquet"))).field("teacher_logprobs").type
    ).startswith("list<element: float")


def test_a_second_store_with_the_same_content_is_refused(
    tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts
):
    first = tmp_path / "first"
    precompute.run(precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, first), **QUIET)
    assert "first" in run_lopd("store", "list").stdout  # registered by content id in the store cache
    with pytest.raises(StoreError, match=f"already exists at {first}.*--allow-duplicate"):
        precompute.run(
            precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "second"), **QUIET
        )
    assert not (tmp_path / "second" / "manifest.json").exists()
    precompute.run(  # rerunning into the same directory is a resume, not a duplicate
        precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, first), **QUIET
    )
    other_seed = precompute_config(
        sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "third", seed=4
    )
    precompute.run(other_seed, **QUIET)  # different sampling seed: different content, accepted
