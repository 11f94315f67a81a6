"""Every bad input is a one-line error (exit status 2) that says what is wrong and what to do (issue 12).

Each case runs the command line's own entry point (``lightning_opd.cli.main``, in-process: argument
parsing, the job and the error mapping are the real ones, without paying a Python start-up per case);
``test_one_line_error_through_a_subprocess`` checks that the same path holds for a real ``lopd`` process.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_lopd

from lightning_opd.cli import main
from lightning_opd.prompts import write_jsonl
from lightning_opd.stage2.runs import MetricsLog, read_metrics_lines
from lightning_opd.store.files import sha256_file
from lightning_opd.store.rowcheck import check_rows, row_problem


def lopd_error(capsys, *args) -> str:
    """Run ``lopd *args``; assert exit status 2 with one error line and no traceback; return that line."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert status == 2, f"expected exit status 2, got {status}:\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"lopd {args[0]}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def lopd_ok(capsys, *args) -> str:
    capsys.readouterr()
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out + captured.err


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl([{"prompt_id": "a", "prompt": "1+2=", "answer": "3"}], tmp_path / "ok.jsonl")


def rollout_args(student, prompts, out, *extra):
    return ["rollout", "--student", student, "--prompts", prompts, "--out", out, "--max-new-tokens", 4,
            "--backend", "transformers", "--part-size", 4, *extra]  # fmt: skip


def eval_args(model, prompts, *extra):
    return ["eval", "--model", model, "--prompts", prompts, "--max-new-tokens", 4, "--backend", "transformers",
            *extra]  # fmt: skip


def train_args(student, stores, out, *extra):
    return ["train", "--student", student, "--stores", stores, "--out", out, "--steps", 1, "--batch-size", 4,
            "--micro-batch-size", 4, "--shuffle-buffer", 8, *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"prompt": "1+2="}\nnull\n', "ok-ish.jsonl:2 is a JSON null, not an object"),
        (b'"1+2="\n', "ok-ish.jsonl:1 is a JSON string, not an object"),
        (b'{"prompt": "1+2=\xff\xfe"}\n', "is not UTF-8 text"),
    ],
    ids=["null-line", "bare-string", "not-utf8"],
)
def test_bad_jsonl_prompt_file(capsys, tmp_path, micro_student_dir, content, expected):
    bad = tmp_path / "ok-ish.jsonl"
    bad.write_bytes(content)
    line = lopd_error(capsys, *rollout_args(micro_student_dir, bad, tmp_path / "out"))
    assert expected in line


def test_garbage_parquet_prompt_file(capsys, tmp_path, micro_student_dir):
    bad = tmp_path / "prompts.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    line = lopd_error(capsys, *rollout_args(micro_student_dir, bad, tmp_path / "out"))
    assert "is not a readable Parquet file" in line


def test_unencodable_prompts_are_skipped_counted_and_reported(capsys, tmp_path, micro_student_dir):
    """Choice: a prompt the tokenizer cannot encode (it would hold the unknown token) is skipped, warned
    about and counted in the manifest's prompt_set.skipped_prompts, like a prompt that does not fit."""
    rows = [
        {"prompt_id": "ok", "prompt": "1+2=", "answer": "3"},
        {"prompt_id": "accent", "prompt": "1+2=é", "answer": "3"},
    ]
    prompts = write_jsonl(rows, tmp_path / "p.jsonl")
    out = tmp_path / "rollouts"
    with pytest.warns(
        UserWarning, match=r"skipped 1 of 2 prompts with characters .* cannot encode.*'accent'"
    ):
        lopd_ok(capsys, *rollout_args(micro_student_dir, prompts, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_set"]["skipped_prompts"] == 1
    assert manifest["stats"]["num_rollouts"] == 1


def test_only_unencodable_prompts_is_an_error(capsys, tmp_path, micro_student_dir):
    prompts = write_jsonl([{"prompt_id": "x", "prompt": "ünïcode"}], tmp_path / "p.jsonl")
    with pytest.warns(UserWarning):
        line = lopd_error(capsys, *rollout_args(micro_student_dir, prompts, tmp_path / "out"))
    assert "encodes with its tokenizer" in line


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def test_unknown_device(capsys, tmp_path, micro_student_dir, prompts):
    line = lopd_error(capsys, *eval_args(micro_student_dir, prompts, "--device", "bogus"))
    assert "unknown device 'bogus'" in line
    # Refused while reading the flags: no run directory is claimed that a corrected rerun would trip over.
    out = tmp_path / "out"
    line = lopd_error(capsys, *rollout_args(micro_student_dir, prompts, out, "--device", "bogus"))
    assert "unknown device 'bogus'" in line and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path, micro_student_dir, prompts):
    line = lopd_error(capsys, *eval_args(micro_student_dir, prompts, "--device", "cuda"))
    assert "CUDA is not available" in line and "--device cpu" in line
    line = lopd_error(capsys, *rollout_args(micro_student_dir, prompts, tmp_path / "out", "--device", "cuda"))
    assert "CUDA is not available" in line


@pytest.mark.parametrize("command", ["rollout", "eval"])
def test_unknown_chat_template_mode(capsys, tmp_path, micro_student_dir, prompts, command):
    extra = ("--chat-template", "sometimes")
    args = (
        rollout_args(micro_student_dir, prompts, tmp_path / "out", *extra)
        if command == "rollout"
        else eval_args(micro_student_dir, prompts, *extra)
    )
    # argparse refuses it before anything runs, with the choices; the config refuses it too (library use)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "--chat-template: invalid choice: 'sometimes'" in err and "'always'" in err  # with the list
    from lightning_opd.errors import ConfigError
    from lightning_opd.prompts import check_chat_template_mode

    with pytest.raises(
        ConfigError, match=r"chat_template must be one of \('auto', 'always', 'never'\), got 'sometimes'"
    ):
        check_chat_template_mode("sometimes")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--samples", 2, "--ks", "garbage"), "--ks must be comma-separated ints"),
        (("--samples", 2, "--ks", "8"), "pass@8 needs at least 8 samples per prompt, got --samples 2"),
        (("--samples", 2, "--ks", "0"), "--ks values must be finite >= 1"),
    ],
    ids=["garbage", "k-above-samples", "k-zero"],
)
def test_eval_ks(capsys, micro_student_dir, prompts, extra, expected):
    assert expected in lopd_error(capsys, *eval_args(micro_student_dir, prompts, *extra))


def test_eval_out_that_cannot_be_written(capsys, tmp_path, micro_student_dir, prompts):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    line = lopd_error(capsys, *eval_args(micro_student_dir, prompts, "--out", a_file / "result.json"))
    assert "cannot be written" in line
    line = lopd_error(capsys, *eval_args(micro_student_dir, prompts, "--out", tmp_path))
    assert "is a directory" in line


def test_store_weights_garbage(capsys, tmp_path, sft_student_dir, micro_store):
    line = lopd_error(
        capsys, *train_args(sft_student_dir, micro_store, tmp_path / "run", "--store-weights", "garbage")
    )
    assert "--store-weights must be comma-separated floats" in line


@pytest.mark.parametrize("command", ["rollout", "train"])
def test_out_is_an_existing_file(
    capsys, tmp_path, micro_student_dir, sft_student_dir, micro_store, prompts, command
):
    out = tmp_path / "taken"
    out.write_text("not a directory")
    args = (
        rollout_args(micro_student_dir, prompts, out)
        if command == "rollout"
        else train_args(sft_student_dir, micro_store, out)
    )
    assert "is a file, not a directory" in lopd_error(capsys, *args)
    assert out.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------


def test_model_dir_with_garbage_weights(capsys, tmp_path, micro_student_dir, prompts):
    model = tmp_path / "model"
    shutil.copytree(micro_student_dir, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"\x00garbage" * 100)
    line = lopd_error(capsys, *eval_args(model, prompts))
    assert "could not load model weights" in line and "save_pretrained" in line


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"model_type": "qwen2", "hidden_size": "wide"}'])
def test_model_dir_with_garbage_config(capsys, tmp_path, micro_student_dir, prompts, content):
    model = tmp_path / "model"
    shutil.copytree(micro_student_dir, model)
    (model / "config.json").write_text(content)
    line = lopd_error(capsys, *eval_args(model, prompts))
    assert str(model) in line


# ---------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------


def copy_store(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_rollouts", "locks"))
    return dst


def edit_shard(store, edit) -> None:
    """Rewrite shard 0 with ``edit(table) -> table`` and make the manifest's checksum agree (as a tool would)."""
    manifest = json.loads((store / "manifest.json").read_text())
    entry = min(manifest["shards"], key=lambda s: s["part"])
    path = store / entry["file"]
    pf = pq.ParquetFile(path)
    table = edit(pf.read())
    pq.write_table(table.replace_schema_metadata(pf.schema_arrow.metadata), path)
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (store / "manifest.json").write_text(json.dumps(manifest))


def set_first_value(table, column, value):
    rows = table.to_pylist()
    row = next(r for r in rows if len(r["response_ids"]) > 0)
    row[column][0] = value
    return pa.Table.from_pylist(rows, schema=table.schema)


@pytest.mark.parametrize(
    "column, value, expected",
    [
        ("teacher_logprobs", 5.0, "teacher_logprobs holds 5 > 0"),
        ("teacher_logprobs", float("-inf"), "teacher_logprobs holds a non-finite value (-inf)"),
        ("response_ids", 5000, "response_ids holds id 5000 outside the student's vocabulary"),
    ],
    ids=["plus5", "minus-inf", "out-of-vocab"],
)
def test_train_refuses_bad_rows_naming_store_and_row(
    capsys, tmp_path, sft_student_dir, micro_store, column, value, expected
):
    store = copy_store(micro_store, tmp_path / "store")
    edit_shard(store, lambda t: set_first_value(t, column, value))
    line = lopd_error(capsys, *train_args(sft_student_dir, store, tmp_path / "run", "--batch-size", 10))
    assert expected in line
    assert f"store {store}, row prompt_id=" in line and "sample_index=" in line
    assert not (tmp_path / "run" / "final").exists()


def test_manifest_shard_entries_with_wrong_types(capsys, tmp_path, sft_student_dir, micro_store):
    store = copy_store(micro_store, tmp_path / "store")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = "ten"
    manifest["shards"][1] = ["not", "an", "object"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    line = lopd_error(capsys, *train_args(sft_student_dir, store, tmp_path / "run"))
    assert "shards[0].rows must be int, got 'ten'" in line and "shards[1] must be an object" in line
    assert "wrong types" in lopd_error(capsys, "store", "inspect", store)
    capsys.readouterr()
    assert main(["store", "verify", str(store)]) == 1  # verify reports problems, it does not crash
    assert "wrong types" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Stage two's row check, unit level
# ---------------------------------------------------------------------------------------------


def make_row(**changes):
    row = {
        "prompt_id": "p",
        "sample_index": 0,
        "prompt_ids": np.array([1, 2]),
        "response_ids": np.array([3, 4]),
        "behavior_logprobs": np.array([-0.5, -1.0], np.float32),
        "teacher_logprobs": np.array([-0.1, 5e-5], np.float32),  # fp rounding above 0 is tolerated
        "teacher_topk_ids": np.array([[3, 9], [4, 1]]),
        "teacher_topk_logprobs": np.array([[-0.1, -3.0], [0.0, -4.0]], np.float32),
        "store_index": 0,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, None),
        ({"prompt_ids": np.array([-1, 2])}, "prompt_ids holds id -1 outside"),
        ({"response_ids": np.array([3, 10])}, "response_ids holds id 10 outside"),
        ({"teacher_topk_ids": np.array([[3, 10], [4, 1]])}, "teacher_topk_ids holds id 10"),
        ({"behavior_logprobs": np.array([np.nan, -1.0])}, "behavior_logprobs holds a non-finite value (nan)"),
        ({"teacher_logprobs": np.array([-1.0, 0.01])}, "teacher_logprobs holds 0.01 > 0"),
        (
            {"teacher_topk_logprobs": np.array([[-1.0, np.inf], [0, 0]])},
            "teacher_topk_logprobs holds a non-finite",
        ),
        ({"teacher_logprobs": np.array([-1.0])}, "teacher_logprobs has 1 positions but response_ids has 2"),
    ],
)
def test_row_problem(changes, expected):
    problem = row_problem(make_row(**changes), vocab_size=10)
    assert problem is None if expected is None else expected in problem


def test_check_rows_names_the_store_and_row(tmp_path):
    class Store:
        def __init__(self, root):
            self.root = root

    stores = [Store(tmp_path / "a"), Store(tmp_path / "b")]
    check_rows([make_row()], stores, vocab_size=10)
    bad = make_row(store_index=1, prompt_id="q7", sample_index=3, response_ids=np.array([3, 99]))
    with pytest.raises(
        Exception, match=r"store .*/b, row prompt_id='q7' sample_index=3: response_ids holds id 99"
    ):
        check_rows([make_row(), bad], stores, vocab_size=10)


# ---------------------------------------------------------------------------------------------
# Resume with a torn metrics.jsonl
# ---------------------------------------------------------------------------------------------


def test_metrics_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        MetricsLog(path, truncate_after_step=2).close()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_metrics_bad_line_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(Exception, match=r"metrics.jsonl:2 is not a JSON object"):
        read_metrics_lines(path)


def test_train_resumes_past_a_torn_metrics_line(capsys, tmp_path, sft_student_dir, micro_store):
    """Choice: recover. The torn last line (a crash mid-write) is dropped and the drop is reported."""
    out = tmp_path / "run"
    lopd_ok(capsys, *train_args(sft_student_dir, micro_store, out, "--steps", 2, "--save-every", 1))
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a crash in the middle of writing step 3's line
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        text = lopd_ok(
            capsys, *train_args(sft_student_dir, micro_store, out, "--steps", 3, "--save-every", 1)
        )
    assert "resumed from" in text
    assert [row["step"] for _, row in read_metrics_lines(metrics)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# The same through a real process
# ---------------------------------------------------------------------------------------------


def test_one_line_error_through_a_subprocess(tmp_path, micro_student_dir):
    bad = tmp_path / "p.jsonl"
    bad.write_text("null\n")
    result = run_lopd(*rollout_args(micro_student_dir, bad, tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lopd rollout: error: ")
    assert "is a JSON null, not an object" in result.stderr
