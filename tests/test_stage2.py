"""Stage two: collation and horizons, the trainer end to end, exact resume, no teacher, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import precompute_config, run_lopd
from transformers import AutoModelForCausalLM

from lightning_opd.errors import ConfigError, StoreError, TeacherConsistencyError, TrainingError
from lightning_opd.models.fingerprint import model_fingerprint
from lightning_opd.models.provenance import read_provenance
from lightning_opd.stage2 import step
from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.store import open_store
from pipelines import precompute, train

QUIET = dict(log=lambda *_: None)


def config(student, store, out, **overrides):
    settings = dict(
        student=str(student),
        stores=str(store),
        out=str(out),
        steps=4,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-3,
        shuffle_buffer=8,
        seed=0,
    )
    settings.update(overrides)
    return train.TrainConfig(**settings)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def row(prompt, response, teacher=None):
    n = len(response)
    return {
        "prompt_id": "p",
        "sample_index": 0,
        "prompt_ids": prompt,
        "response_ids": response,
        "teacher_logprobs": teacher if teacher is not None else [-0.1 * (i + 1) for i in range(n)],
        "behavior_logprobs": [-0.5] * n,
    }


def test_collate_aligns_stored_logprobs_with_predicting_positions():
    rows = [row([5, 6], [7, 8, 9]), row([5, 6, 7, 8], [9])]
    batch = collate(rows, horizon=10, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]
    # response token t of a row with prompt length P is predicted at column P + t - 1
    assert batch.mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch.teacher_logprobs[0, 1:].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert batch.targets[0, 1:].tolist() == [7, 8, 9]


def test_horizon_cuts_sequences_and_masks():
    rows = [row([5, 6], [7, 8, 9, 10]), row([5], [7, 8])]
    batch = collate(rows, horizon=2, pad_id=0)
    assert batch.input_ids.shape == (2, 4)  # the longest prompt+min(response, H): nothing past H is computed
    assert batch.mask.sum(1).tolist() == [2, 2]
    assert collate(rows, horizon=1, pad_id=0).mask.sum().item() == 2
    empty = collate([row([5], [])], horizon=4, pad_id=0)
    assert empty.mask.sum().item() == 0


def test_student_logprobs_match_a_naive_forward(micro_student_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    rows = [row([5, 6], [7, 8, 9]), row([5, 6, 7, 8], [9, 11])]
    batch = collate(rows, horizon=10, pad_id=0)
    token = student_token_batch(model, batch, needs_topk=False, chunk_size=3)
    logp = torch.log_softmax(
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1
    )
    for b, j in zip(*torch.nonzero(batch.mask, as_tuple=True)):
        assert token.student_logprobs[b, j].item() == pytest.approx(
            logp[b, j, batch.input_ids[b, j + 1]].item(), abs=1e-5
        )
    assert token.student_logprobs[batch.mask == 0].abs().sum() == 0


def test_train_end_to_end_through_the_cli(micro_store, sft_student_dir, tmp_path, opd_prompts):
    out = tmp_path / "opd"
    result = run_lopd(
        "train",
        "--student",
        sft_student_dir,
        "--stores",
        micro_store,
        "--out",
        out,
        "--steps",
        3,
        "--batch-size",
        4,
        "--micro-batch-size",
        2,
        "--lr",
        "1e-3",
        "--eval-prompts",
        opd_prompts,
        "--eval-every",
        3,
        "--horizon",
        "fixed",
        "--horizon-tokens",
        5,
    )
    assert "no teacher loaded" in result.stdout and "step 3" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["horizon"] == 5 for r in rows)
    assert (
        all(np.isfinite(r["loss"]) and "kl_student_teacher" in r for r in rows)
        and "eval_accuracy" in rows[-1]
    )
    prov = read_provenance(out / "final")
    assert prov.stage == "lightning_opd"
    assert (
        prov.sft_teacher == read_provenance(sft_student_dir).sft_teacher
    )  # the chain back to the SFT teacher
    assert prov.inputs["stores"][0]["store_id"] == open_store(micro_store).store_id
    assert prov.model_fingerprint == model_fingerprint(out / "final") != model_fingerprint(sft_student_dir)


def test_no_teacher_is_loaded(tmp_path, sft_student_dir, micro_teacher_dir, opd_prompts, monkeypatch):
    # Score with a copy of the teacher, then delete it: training must not need it, nor load any other model.
    teacher = tmp_path / "teacher"
    shutil.copytree(micro_teacher_dir, teacher)
    store = tmp_path / "store"
    precompute.run(
        precompute_config(sft_student_dir, teacher, opd_prompts, store, sft_teacher=str(teacher)), **QUIET
    )
    shutil.rmtree(teacher)
    loaded = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    train.run(config(sft_student_dir, store, tmp_path / "opd", steps=2), **QUIET)
    assert loaded == [str(sft_student_dir)]


def test_exact_resume_after_a_crash(micro_store, sft_student_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.run(config(sft_student_dir, micro_store, straight, steps=6, save_every=2), **QUIET)
    crashed = tmp_path / "crashed"
    real_collate = step.collate  # the shared update step collates each micro-batch
    calls = {"n": 0}

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # 2 micro-batches per step: the first micro-batch of step 5
            raise RuntimeError("injected crash")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(step, "collate", crash_at_step_5)
    with pytest.raises(RuntimeError, match="injected crash"):
        train.run(config(sft_student_dir, micro_store, crashed, steps=6, save_every=2), **QUIET)
    monkeypatch.setattr(step, "collate", real_collate)
    logs = []
    train.run(config(sft_student_dir, micro_store, crashed, steps=6, save_every=2), log=logs.append)
    assert any("resumed from" in line and "step 4" in line for line in logs)
    assert losses(crashed) == pytest.approx(losses(straight), abs=1e-6)
    assert model_fingerprint(crashed / "final") == model_fingerprint(straight / "final")
    saved = json.loads((crashed / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert saved["stream"]["shuffle_buffer_bytes"] == 1024 * 2**20  # --shuffle-buffer-mb reaches the stream


def test_resume_from_another_runs_checkpoint_is_refused(micro_store, sft_student_dir, tmp_path):
    first = tmp_path / "first"
    train.run(config(sft_student_dir, micro_store, first, steps=3, save_every=2), **QUIET)
    checkpoint = first / "checkpoints" / "step-2"
    with pytest.raises(TrainingError, match="belongs to another run"):
        train.run(
            config(
                sft_student_dir, micro_store, tmp_path / "second", steps=3, lr=5e-4, resume=str(checkpoint)
            ),
            **QUIET,
        )


def test_nan_loss_stops_with_the_step_and_rows_and_saves_nothing(
    micro_store, sft_student_dir, tmp_path, monkeypatch
):
    import lightning_opd.stage2.objectives as objectives

    real = objectives.LightningOPD.__call__

    def nan_loss(self, batch):
        loss, metrics = real(self, batch)
        return loss * float("nan"), metrics

    monkeypatch.setattr(objectives.LightningOPD, "__call__", nan_loss)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 1 on store rows \[add-"):
        train.run(config(sft_student_dir, micro_store, out, save_every=1), **QUIET)
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"stores": "{missing}"}, StoreError, "directory missing"),
        ({"stores": "{uncommitted}"}, StoreError, "manifest"),
        ({"horizon": "fixed", "horizon_tokens": 100}, ConfigError, "100"),
        ({"shuffle_buffer_mb": 0}, ConfigError, "shuffle_buffer_mb must be >= 1"),
        ({"shuffle_buffer": 0}, ConfigError, "shuffle_buffer must be >= 1"),
        ({"student": "{other_student}"}, TeacherConsistencyError, "sampled by student"),
        ({"objective": "topk", "stores": "{no_topk}"}, StoreError, "top-k"),
    ],
)
def test_bad_input(
    overrides, error, message, micro_store, sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path
):
    (tmp_path / "uncommitted" / "commits").mkdir(parents=True)
    subst = {
        "{missing}": tmp_path / "nope",
        "{uncommitted}": tmp_path / "uncommitted",
        "{other_student}": micro_teacher_dir,
    }
    if "{no_topk}" in overrides.values():
        precompute.run(
            precompute_config(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "plain"), **QUIET
        )
        subst["{no_topk}"] = tmp_path / "plain"
    settings = {k: str(subst.get(v, v)) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(error, match=message):
        train.run(
            config(
                settings.pop("student", sft_student_dir),
                settings.pop("stores", micro_store),
                tmp_path / "out",
                **settings,
            ),
            **QUIET,
        )
    assert not (tmp_path / "out" / "final").exists()
