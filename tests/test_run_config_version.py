"""Saved run configs are versioned: a run started before a config field existed still resumes (the
missing field reads as its default, the checkpoint's older run id is recognised), a config from a
newer lightning-opd or with a field this version no longer has is refused with what to do."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from test_stage2 import QUIET, config, losses

from lightning_opd.config import CONFIG_VERSION, CONFIG_VERSION_KEY, prepare_output_dir
from lightning_opd.errors import OutputExistsError
from lightning_opd.stage2.runs import RUN_ID_FORMAT
from pipelines import train


@dataclass
class Job:
    out: str
    lr: float = 1e-3
    added_later: bool = False  # a field a newer version added, with the old behaviour as its default


def write(path, data):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))


def test_a_config_without_a_later_field_is_the_same_run_and_is_kept_as_written(tmp_path):
    out = tmp_path / "run"
    write(out, {"out": str(out), "lr": 1e-3})  # version 1: no version key, no added_later
    prepare_output_dir(out, Job(str(out)))
    saved = json.loads((out / "config.json").read_text())
    assert saved[CONFIG_VERSION_KEY] == CONFIG_VERSION and saved["added_later"] is False
    assert json.loads((out / "config.v1.json").read_text()) == {"out": str(out), "lr": 1e-3}
    prepare_output_dir(out, Job(str(out)))  # and again, now from the current version


def test_a_later_field_set_to_another_value_is_another_run(tmp_path):
    out = tmp_path / "run"
    write(out, {"out": str(out), "lr": 1e-3})
    with pytest.raises(OutputExistsError, match=r"differs in \['added_later'\]"):
        prepare_output_dir(out, Job(str(out), added_later=True))


def test_a_config_from_a_newer_version_or_with_a_removed_field_is_refused(tmp_path):
    newer = tmp_path / "newer"
    write(newer, {"out": str(newer), "lr": 1e-3, CONFIG_VERSION_KEY: CONFIG_VERSION + 1})
    with pytest.raises(OutputExistsError, match="newer lightning-opd .*pip install -U"):
        prepare_output_dir(newer, Job(str(newer)))
    gone = tmp_path / "gone"
    write(gone, {"out": str(gone), "lr": 1e-3, "removed_since": 3})
    with pytest.raises(OutputExistsError, match=r"fields \['removed_since'\] that this lightning-opd's Job"):
        prepare_output_dir(gone, Job(str(gone)))


def test_a_run_id_ignores_fields_at_their_defaults(micro_store, sft_student_dir, tmp_path):
    a = config(sft_student_dir, micro_store, tmp_path / "a")
    assert (
        a.run_id()
        == config(sft_student_dir, micro_store, tmp_path / "a", gradient_checkpointing=False).run_id()
    )
    assert (
        a.run_id()
        != config(sft_student_dir, micro_store, tmp_path / "a", gradient_checkpointing=True).run_id()
    )
    assert a.run_id() == config(sft_student_dir, micro_store, tmp_path / "a", steps=9).run_id()  # resumable


def test_a_run_checkpointed_by_an_older_version_resumes_exactly(micro_store, sft_student_dir, tmp_path):
    straight = tmp_path / "straight"
    train.run(config(sft_student_dir, micro_store, straight, steps=4, save_every=2), **QUIET)
    old = tmp_path / "old"
    train.run(config(sft_student_dir, micro_store, old, steps=3, save_every=2), **QUIET)
    # Make it what an older lightning-opd left: a config without the version and without a field added
    # since, and a checkpoint whose run id hashed every field of that config.
    saved = json.loads((old / "config.json").read_text())
    del saved[CONFIG_VERSION_KEY], saved["gradient_checkpointing"]
    (old / "config.json").write_text(json.dumps(saved))
    state_file = old / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("run_id_format") == RUN_ID_FORMAT
    state["run_id"] = config(sft_student_dir, micro_store, old).legacy_run_id(set(saved))
    state_file.write_text(json.dumps(state))

    logs = []
    train.run(config(sft_student_dir, micro_store, old, steps=4, save_every=2), log=logs.append)
    assert any("resumed from" in line and "step 2" in line for line in logs)
    assert losses(old) == pytest.approx(losses(straight), abs=1e-6)
    assert (old / "config.v1.json").exists()
