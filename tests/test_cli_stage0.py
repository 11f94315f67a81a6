"""`lopd sft` and `lopd eval` end to end on micro models, through the real command line."""

import json

import pytest
from conftest import run_lopd as lopd

from lightning_opd.models.fingerprint import local_behavior, model_fingerprint
from lightning_opd.models.provenance import read_provenance
from lightning_opd.prompts import write_jsonl
from lightning_opd.toy.task import sample_problems, to_records


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "sft.jsonl"
    write_jsonl(to_records(sample_problems("sft", 12, digits=(1, 2)), with_solution=True), path)
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, micro_teacher_dir, micro_student_dir, prompt_file):
    out = tmp_path_factory.mktemp("runs") / "sft"
    lopd(
        "sft",
        "--teacher",
        micro_teacher_dir,
        "--student",
        micro_student_dir,
        "--prompts",
        prompt_file,
        "--out",
        out,
        "--steps",
        3,
        "--batch-size",
        4,
        "--max-new-tokens",
        8,
        "--warmup-steps",
        1,
        "--temperature",
        1.0,
        "--backend",
        "transformers",
    )
    return out


def test_sft_writes_model_data_and_provenance(sft_run, micro_teacher_dir, micro_student_dir):
    for name in (
        "config.json",
        "sft_config.json",
        "sft_data.jsonl",
        "metrics.jsonl",
        "lopd_provenance.json",
        "tokenizer_config.json",
    ):
        assert (sft_run / name).exists(), name
    # the job's config survives next to the model's own config.json (a rerun compares against it)
    job = json.loads((sft_run / "sft_config.json").read_text())
    assert job["steps"] == 3 and job["teacher"] == str(micro_teacher_dir)
    prov = read_provenance(sft_run)
    assert prov.stage == "sft"
    assert prov.sft_teacher["fingerprint"] == model_fingerprint(micro_teacher_dir)
    # the teacher's behaviour record, for a stage one that reaches it through a server only
    assert prov.sft_teacher["behavior"] == local_behavior(micro_teacher_dir)
    assert prov.sft_teacher_identity.fingerprint == model_fingerprint(micro_teacher_dir)
    assert prov.model_fingerprint == model_fingerprint(sft_run) != model_fingerprint(micro_student_dir)
    assert prov.config["steps"] == 3
    rows = [json.loads(line) for line in (sft_run / "sft_data.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["response_ids"] for r in rows)


def test_sft_refuses_another_run_in_the_same_dir(sft_run, micro_teacher_dir, micro_student_dir, prompt_file):
    before = model_fingerprint(sft_run)
    result = lopd(
        "sft",
        "--teacher",
        micro_teacher_dir,
        "--student",
        micro_student_dir,
        "--prompts",
        prompt_file,
        "--out",
        sft_run,
        "--steps",
        5,
        "--warmup-steps",
        1,
        check=False,
    )
    assert result.returncode == 2
    assert "already holds a different run" in result.stderr and "steps" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert model_fingerprint(sft_run) == before


def test_eval_prints_table_and_writes_json(sft_run, tmp_path, prompt_file):
    out = tmp_path / "eval.json"
    result = lopd(
        "eval",
        "--model",
        sft_run,
        "--prompts",
        prompt_file,
        "--samples",
        2,
        "--ks",
        "1,2",
        "--max-new-tokens",
        8,
        "--out",
        out,
        "--name",
        "micro",
    )
    assert "greedy acc" in result.stdout and "pass@2" in result.stdout and "micro" in result.stdout
    data = json.loads(out.read_text())["result"]
    assert (
        data["num_prompts"] == 12
        and 0 <= data["greedy_accuracy"] <= 1
        and set(data["pass_at_k"]) == {"1", "2"}
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "{empty}"], "is empty"),
        (["--prompts", "{nofield}"], "missing text field 'prompt'"),
        (["--student", "{tmp}"], "no config.json"),
        (["--teacher", "{foreign_tok}"], "different tokenizers"),
    ],
)
def test_sft_bad_input(args, message, tmp_path, micro_teacher_dir, micro_student_dir, prompt_file):
    from transformers import AutoModelForCausalLM

    from lightning_opd.toy.tokenizer import build_char_tokenizer

    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl([{"question": "1+1="}], tmp_path / "nofield.jsonl")
    tok = build_char_tokenizer()
    tok.add_tokens(["<x>"])
    AutoModelForCausalLM.from_pretrained(micro_teacher_dir).save_pretrained(tmp_path / "foreign")
    tok.save_pretrained(tmp_path / "foreign")
    subst = {
        "{empty}": tmp_path / "empty.jsonl",
        "{nofield}": tmp_path / "nofield.jsonl",
        "{tmp}": tmp_path,
        "{foreign_tok}": tmp_path / "foreign",
    }
    base = {"--teacher": micro_teacher_dir, "--student": micro_student_dir, "--prompts": prompt_file}
    base.update({args[0]: subst.get(args[1], args[1])})
    flat = [x for kv in base.items() for x in kv]
    result = lopd("sft", *flat, "--out", tmp_path / "out", "--steps", 2, "--warmup-steps", 1, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
