"""--report-to: every numeric metrics.jsonl field reaches the experiment tracker (issue 21), and progress
bars stay on stderr, out of stdout and the JSON outputs."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_lopd

from lightning_opd import tracking
from lightning_opd.errors import ConfigError
from lightning_opd.tracking import RunTracker


def train_args(student, store, out, *extra):
    return [
        "train", "--student", student, "--stores", store, "--out", out, "--steps", 3, "--batch-size", 4,
        "--micro-batch-size", 2, "--lr", "1e-3", "--shuffle-buffer", 8, *extra,
    ]  # fmt: skip


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(rows):
    """(name, step) -> value for every numeric field of every row, as a tracker should have it."""
    return {(k, r["step"]): float(v) for r in rows for k, v in tracking.numeric_metrics(r).items()}


def tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.update({(tag, e.step): e.value for e in acc.Scalars(tag)})
    return found


def assert_same(found, expected):
    assert set(found) == set(expected), sorted(set(found) ^ set(expected))[:10]
    for key, value in expected.items():  # TensorBoard and MLflow keep float32 / float64
        assert math.isclose(found[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, found[key], value)


def test_train_reports_every_metric_to_tensorboard_and_bars_stay_on_stderr(
    sft_student_dir, micro_store, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("LOPD_PROGRESS", "1")  # draw the bar although stderr is a pipe
    out = tmp_path / "run"
    result = run_lopd(*train_args(sft_student_dir, micro_store, out, "--report-to", "tensorboard"))
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "drift_kl" in rows[0]
    expected = expected_scalars(rows)
    assert ("drift_kl", 1) in expected and ("loss", 3) in expected
    assert_same(tensorboard_scalars(out / "lopd-train"), expected)
    assert json.loads((out / "config.json").read_text())["report_to"] == "tensorboard"
    # The bar (rate, ETA) is on stderr; stdout holds the status lines only.
    assert "stage 2: 100%" in result.stderr and ("step/s" in result.stderr or "s/step" in result.stderr)
    assert "\r" not in result.stdout and "%|" not in result.stdout
    assert any(line.startswith("step 3 |") for line in result.stdout.splitlines())


def test_train_reports_to_mlflow_with_a_local_file_store(sft_student_dir, micro_store, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this for a file store
    out = tmp_path / "run"
    run_lopd(*train_args(sft_student_dir, micro_store, out, "--report-to", "mlflow"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lopd-train")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.params["report_to"] == "mlflow"
    assert run.data.params["lr"] == "0.001" and run.data.params["steps"] == "3"
    found = {
        (key, m.step): m.value
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
    }
    assert_same(found, expected_scalars(metrics_rows(out)))


def test_a_missing_mlflow_backend_is_a_clear_error(sft_student_dir, micro_store, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    result = run_lopd(
        *train_args(sft_student_dir, micro_store, tmp_path / "run", "--report-to", "mlflow"), check=False
    )
    assert (
        result.returncode == 2 and "MLFLOW_TRACKING_URI" in result.stderr and "Traceback" not in result.stderr
    )


def test_a_missing_tracker_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "_installed", lambda name: False)
    with pytest.raises(ConfigError, match=r"pip install tensorboard .*lightning-opd\[trackers\]"):
        RunTracker("tensorboard", tmp_path, "lopd-train")
    with pytest.raises(ConfigError, match="pip install mlflow-skinny"):
        RunTracker("mlflow", tmp_path, "lopd-train")
    with pytest.raises(ConfigError, match="no tracker is installed"):
        RunTracker("all", tmp_path, "lopd-train")
    assert RunTracker("none", tmp_path, "lopd-train").accelerator_kwargs() == {}
    with pytest.raises(ConfigError, match="report_to must be one of"):
        RunTracker("comet", tmp_path, "lopd-train")


def test_numeric_metrics_skip_text_and_nonfinite_values():
    row = {"step": 2, "loss": 0.5, "skipped_step": True, "note": "x", "grad_norm": float("nan"), "n": 3}
    assert tracking.numeric_metrics(row) == {"loss": 0.5, "skipped_step": 1, "n": 3}
    hp = tracking.hyperparameters({"a": None, "b": [1, 2], "c": 1.5, "d": "s"})
    assert hp == {"a": "null", "b": "[1, 2]", "c": 1.5, "d": "s"}


def test_sft_reports_its_metrics_rows_to_tensorboard(micro_student_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from lightning_opd.models.loading import load_causal_lm
    from lightning_opd.stage0.sft import SFTExample, SFTTrainConfig, train_sft

    model, tokenizer = load_causal_lm(micro_student_dir, dtype="float32", device="cpu")
    examples = [
        SFTExample([5, 6, 7], [8, 9, tokenizer.eos_token_id]),
        SFTExample([5, 7], [9, tokenizer.eos_token_id]),
    ]
    config = SFTTrainConfig(steps=4, batch_size=2, warmup_steps=1, log_every=2)
    tracker = RunTracker("tensorboard", tmp_path, "lopd-sft", config)
    history = train_sft(
        model, examples, config, pad_id=tokenizer.pad_token_id, log=lambda *_: None, tracker=tracker
    )
    assert [h["step"] for h in history] == [2, 4]
    assert_same(tensorboard_scalars(tmp_path / "lopd-sft"), expected_scalars(history))


def test_train_online_reports_to_tensorboard(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "online"
    run_lopd(
        "train-online", "--student", sft_student_dir, "--teacher", micro_teacher_dir, "--prompts", opd_prompts,
        "--out", out, "--steps", 2, "--prompts-per-step", 2, "--n", 2, "--max-new-tokens", 4, "--lr", "1e-3",
        "--micro-batch-size", 4, "--report-to", "tensorboard",
    )  # fmt: skip
    rows = metrics_rows(out)
    assert ("sample_s", 2) in expected_scalars(rows)
    assert_same(tensorboard_scalars(out / "lopd-train-online"), expected_scalars(rows))


def test_store_verify_json_stays_json_with_the_bar_on(micro_store, monkeypatch):
    monkeypatch.setenv("LOPD_PROGRESS", "1")
    result = run_lopd("store", "verify", micro_store, "--json")
    assert json.loads(result.stdout)["ok"] is True and "verify: 100%" in result.stderr


def test_train_reports_to_wandb_offline(sft_student_dir, micro_store, tmp_path, monkeypatch):
    # wandb 0.31 has no Python reader for its offline run file: the history records are protobuf with
    # each value as JSON text, so the keys and values are looked for in the file's bytes.
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_lopd(*train_args(sft_student_dir, micro_store, out, "--report-to", "wandb"))
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    rows = metrics_rows(out)
    for key, step in expected_scalars(rows):
        value = tracking.numeric_metrics(next(r for r in rows if r["step"] == step))[key]
        assert key.encode() in data and json.dumps(value).encode() in data, (key, step, value)
