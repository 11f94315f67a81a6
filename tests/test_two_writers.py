"""Two writers into one output at the same time (issue 12): each race ends with one clean winner or a
clear refusal (exit status 2, one line), never with a store that verifies but mixes both runs.

The commands run as real ``lopd`` processes started together; which one wins is up to the scheduler,
so the assertions hold for every interleaving: the loser (if any) is refused with a message that says
what to do, and the output verifies and is exactly the winner's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_store_common import make_header, write_store

from lightning_opd.store.verify import verify_store
from storage_schemas import logprob_store_v1 as fmt


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_opd.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def race(*commands) -> list[tuple[int, str]]:
    """Start every command before waiting for any; (exit status, stderr) of each."""
    procs = [start(*c) for c in commands]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        results.append((p.returncode, err))
    return results


def assert_winner_or_refusal(results, refusal_words: tuple[str, ...]) -> None:
    statuses = [status for status, _ in results]
    assert 0 in statuses, results
    for status, err in results:
        assert status in (0, 2), err
        assert "Traceback" not in err
        if status == 2:
            line = err.strip().splitlines()[-1]
            assert line.startswith("lopd "), err
            assert any(w in line for w in refusal_words), line


def precompute_args(student, teacher, prompts, out, seed):
    return ["precompute", "--student", student, "--teacher", teacher, "--prompts", prompts, "--out", out,
            "--max-new-tokens", 6, "--part-size", 2, "--backend", "transformers", "--temperature", 1.0,
            "--seed", seed]  # fmt: skip


def test_two_precomputes_same_command(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    out = tmp_path / "store"
    args = precompute_args(sft_student_dir, micro_teacher_dir, opd_prompts, out, seed=3)
    results = race(args, args)
    assert_winner_or_refusal(results, ("another run is writing shard 0",))
    report = verify_store(out)
    assert report.ok, report.format()
    manifest = json.loads((out / fmt.MANIFEST_FILE).read_text())
    assert manifest["sampling"]["seed"] == 3 and manifest["stats"]["num_rollouts"] == 10


def test_two_precomputes_different_settings(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts):
    out = tmp_path / "store"
    results = race(
        precompute_args(sft_student_dir, micro_teacher_dir, opd_prompts, out, seed=3),
        precompute_args(sft_student_dir, micro_teacher_dir, opd_prompts, out, seed=4),
    )
    assert sorted(status for status, _ in results) == [0, 2], results  # never both
    assert_winner_or_refusal(results, ("already holds a different run",))
    winner_seed = 3 if results[0][0] == 0 else 4
    report = verify_store(out)
    assert report.ok, report.format()
    # Everything in the directory is the winner's: its config, the store and the intermediate rollouts.
    assert json.loads((out / "config.json").read_text())["seed"] == winner_seed
    for root in (out, out / fmt.ROLLOUTS_SUBDIR):
        assert json.loads((root / fmt.MANIFEST_FILE).read_text())["sampling"]["seed"] == winner_seed


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three mergeable scored stores (same models and sampling, different prompt sets)."""
    root = tmp_path_factory.mktemp("merge-sources")
    stores = []
    for name in "abc":
        prompt_set = {"source": name, "content_hash": name * 64, "num_prompts": 100}
        stores.append(write_store(root / name, num_parts=2, header=make_header(prompt_set=prompt_set)))
    return stores


def merged_sources(out) -> list[str]:
    manifest = json.loads((out / fmt.MANIFEST_FILE).read_text())
    return [s["path"] for s in manifest["extra"]["lineage"][0]["sources"]]


MERGE_REFUSALS = ("is writing", "is not empty", "already holds a different store", "still active")


def test_two_merges_same_sources(tmp_path, sources):
    out = tmp_path / "merged"
    a, b, _ = sources
    results = race(["store", "merge", a, b, "--out", out], ["store", "merge", a, b, "--out", out])
    assert_winner_or_refusal(results, MERGE_REFUSALS)
    report = verify_store(out)
    assert report.ok, report.format()
    assert merged_sources(out) == [str(a.resolve()), str(b.resolve())]


def test_two_merges_different_sources(tmp_path, sources):
    out = tmp_path / "merged"
    a, b, c = sources
    results = race(["store", "merge", a, b, "--out", out], ["store", "merge", a, c, "--out", out])
    assert sorted(status for status, _ in results) == [0, 2], results
    assert_winner_or_refusal(results, MERGE_REFUSALS)
    report = verify_store(out)
    assert report.ok, report.format()
    winner = [a, b] if results[0][0] == 0 else [a, c]
    assert merged_sources(out) == [str(s.resolve()) for s in winner]
    assert report.counts["rows"] == sum(json.loads((s / "manifest.json").read_text())["stats"]["num_rollouts"]
                                        for s in winner)  # fmt: skip


def test_merge_into_an_output_another_writer_holds_is_refused(tmp_path, sources, capsys):
    """The refusal the race above may produce, made deterministic: the output is held while merge starts."""
    from lightning_opd.cli import main
    from lightning_opd.config import exclusive_output

    out = tmp_path / "merged"
    a, b, _ = sources
    with exclusive_output(out, "held by the test"):
        assert main(["store", "merge", str(a), str(b), "--out", str(out)]) == 2
    assert "another `lopd store` filter, merge or compact is writing" in capsys.readouterr().err
    assert not any(out.iterdir())


def test_refused_merge_leaves_no_directories_behind(tmp_path, sources, capsys):
    from lightning_opd.cli import main

    a, _, _ = sources
    assert main(["store", "merge", str(a), str(a), "--out", str(tmp_path / "new" / "merged")]) == 2
    assert "same content" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
