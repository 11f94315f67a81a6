"""The method family as configurations of one trainer: every configuration trains a micro offline step
without NaN, the ESR preset and the StableOPD gold mixture are wired, and `lopd compare --micro` runs."""

import csv
import json

import pytest
import torch
from conftest import run_lopd
from transformers import AutoModelForCausalLM

from lightning_opd.errors import ConfigError, InputError
from lightning_opd.models.provenance import read_provenance
from lightning_opd.prompts import write_jsonl
from lightning_opd.stage2.objectives import Composite, TopKDivergence
from pipelines import train
from pipelines.compare import METHODS as GRID

QUIET = dict(log=lambda *_: None)

# name -> TrainConfig overrides; together they cover every objective option a method uses.
METHODS = {
    "lightning": {},
    "lightning-clip-iw": {"clip_eps": 0.2, "trust_region": 0.0, "importance_weighting": True},
    "lightning-tr-iw": {"importance_weighting": True},
    **{f"opd+-{d}": {"objective": "opd_plus", "divergence": d} for d in ("reverse_kl", "forward_kl", "jsd", "hellinger", "tv", "alpha")},
    "opd+-forward_kl-sg": {"objective": "opd_plus", "divergence": "forward_kl", "stop_gradient": True},
    "opd+-jsd-sg": {"objective": "opd_plus", "divergence": "jsd", "stop_gradient": True},
    **{f"topk-{k}": {"objective": "topk", "topk_kind": k} for k in ("reverse_kl", "forward_kl", "gjsd")},
    "topk-tail-bucket": {"objective": "topk", "topk_tail": "tail_bucket"},
    "esr": {"preset": "esr", "horizon_tokens": 4},
    "topd-25": {"horizon": "fraction", "horizon_fraction": 0.25},
    "popd": {"horizon": "staircase", "horizon_h0": 2, "horizon_dh": 2, "horizon_dk": 1},
    "stableopd": {"ref_kl_coef": 0.01, "gold_nll_coef": 0.1, "gold_prompts": "{prompts}"},
    "stableopd-on-opd+": {"objective": "opd_plus", "divergence": "jsd", "ref_kl_coef": 0.01, "gold_nll_coef": 0.1, "gold_prompts": "{prompts}"},
}  # fmt: skip


def config(student, store, out, **overrides):
    settings = dict(
        student=str(student), stores=str(store), out=str(out), steps=2, batch_size=4, micro_batch_size=2,
        lr=1e-3, shuffle_buffer=8, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return train.TrainConfig(**settings)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_configuration_trains_without_nan(
    method, micro_store, sft_student_dir, opd_prompts, tmp_path
):
    overrides = {k: (str(opd_prompts) if v == "{prompts}" else v) for k, v in METHODS[method].items()}
    out = tmp_path / method
    final = train.run(config(sft_student_dir, micro_store, out, **overrides), **QUIET)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        numbers = torch.tensor([v for v in row.values() if isinstance(v, (int, float))], dtype=torch.float64)
        assert torch.isfinite(numbers).all(), row
        assert row["grad_norm"] > 0  # the step did move the student
    model = AutoModelForCausalLM.from_pretrained(final)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if "gold_nll_coef" in overrides:
        assert all(r["gold_nll"] > 0 and "ref_kl" in r for r in rows)
        assert read_provenance(final).inputs["gold_prompts"]["path"] == str(opd_prompts)


def test_esr_preset_is_a_fixed_horizon_with_top_k_reverse_kl(micro_store, sft_student_dir, tmp_path):
    esr = config(sft_student_dir, micro_store, tmp_path / "esr", preset="esr")
    assert (esr.horizon, esr.horizon_tokens, esr.objective) == ("fixed", 100, "topk")
    objective = esr.build_objective()
    assert isinstance(objective, TopKDivergence) and objective.kind == "reverse_kl"
    reloaded = train.TrainConfig(**{**esr.__dict__})  # config.json round trip: the expansion is idempotent
    assert reloaded.__dict__ == esr.__dict__
    with pytest.raises(ConfigError, match="fixes the horizon"):
        config(
            sft_student_dir,
            micro_store,
            tmp_path / "x",
            preset="esr",
            horizon="fraction",
            horizon_fraction=0.5,
        )
    with pytest.raises(ConfigError, match="top-k objective"):
        config(sft_student_dir, micro_store, tmp_path / "x", preset="esr", objective="opd_plus")
    with pytest.raises(
        ConfigError, match="100 exceeds the store's horizon 8"
    ):  # N is checked against the store
        train.run(esr, **QUIET)


def test_stableopd_objective_and_gold_prompt_checks(micro_store, sft_student_dir, opd_prompts, tmp_path):
    stable = config(
        sft_student_dir,
        micro_store,
        tmp_path / "s",
        ref_kl_coef=0.01,
        gold_nll_coef=0.1,
        gold_prompts=str(opd_prompts),
    )
    objective = stable.build_objective()
    assert isinstance(objective, Composite) and objective.needs_gold and objective.ref_kl_coef == 0.01
    with pytest.raises(ConfigError, match="needs --gold-prompts"):
        config(sft_student_dir, micro_store, tmp_path / "x", gold_nll_coef=0.1)
    no_solutions = write_jsonl(
        [{"prompt_id": "add-1-2", "prompt": "1+2=", "answer": "3"}], tmp_path / "plain.jsonl"
    )
    with pytest.raises(InputError, match="no 'solution' field"):
        train.run(
            config(
                sft_student_dir,
                micro_store,
                tmp_path / "y",
                gold_nll_coef=0.1,
                gold_prompts=str(no_solutions),
            ),
            **QUIET,
        )
    other = write_jsonl([{"prompt_id": "other", "prompt": "1+2=", "solution": "x"}], tmp_path / "other.jsonl")
    with pytest.raises(InputError, match="has no gold solution"):
        train.run(
            config(sft_student_dir, micro_store, tmp_path / "z", gold_nll_coef=0.1, gold_prompts=str(other)),
            **QUIET,
        )


def test_gold_mixture_changes_the_update(micro_store, sft_student_dir, opd_prompts, tmp_path):
    plain = train.run(config(sft_student_dir, micro_store, tmp_path / "plain", steps=1), **QUIET)
    gold = train.run(
        config(
            sft_student_dir,
            micro_store,
            tmp_path / "gold",
            steps=1,
            gold_nll_coef=1.0,
            gold_prompts=str(opd_prompts),
        ),
        **QUIET,
    )
    a = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    b = AutoModelForCausalLM.from_pretrained(gold).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_compare_micro_end_to_end(sft_student_dir, micro_teacher_dir, micro_store, opd_prompts, tmp_path):
    out = tmp_path / "compare"
    result = run_lopd(
        "compare", "--student", sft_student_dir, "--teacher", micro_teacher_dir, "--prompts", opd_prompts,
        "--eval-prompts", opd_prompts, "--store", micro_store, "--out", out, "--micro",
    )  # fmt: skip
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    # `all` without --other-teacher leaves out the teacher-consistency control (test_findings runs it)
    assert [r["method"] for r in rows] == [m for m in GRID if m != "inconsistent"]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert {r["kind"] for r in rows} == {"baseline", "offline", "online"}
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and float(r["total_s"]) >= float(r["train_s"])
        if r["kind"] == "offline":  # stage one is counted in an offline method's total
            assert float(r["stage_one_s"]) > 0 and float(r["total_s"]) > float(r["train_s"])
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "online-stableopd" in result.stdout and "total s" in result.stdout
