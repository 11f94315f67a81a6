"""Stage one's vLLM engine settings: validated in the configs, recorded in the manifest.

The engine itself is exercised in tests/test_vllm.py (-m vllm); here the transformers backend shows
the settings recorded as not applicable, and the validation runs without vLLM installed.
"""

import json
import shutil

import pytest
from conftest import precompute_config

from lightning_opd.cli import main as lopd_main
from lightning_opd.errors import ConfigError
from lightning_opd.stage1.build import engine_config
from lightning_opd.store import open_store, verify_store
from pipelines.precompute import ScoreConfig
from storage_schemas.logprob_store_v1 import header_problems


def config(**overrides):
    return precompute_config("student", "teacher", "prompts.jsonl", "out", **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(backend="vllm", max_num_seqs=0), r"^max_num_seqs must be None or >= 1, got 0"),
        (dict(backend="vllm", tensor_parallel_size=0), r"^tensor_parallel_size must be >= 1, got 0"),
        (dict(backend="vllm", gpu_memory_utilization=1.5), r"gpu_memory_utilization must be .* got 1.5"),
        (dict(backend="vllm", max_model_len=1), r"^max_model_len must be None or >= 2, got 1"),
        (
            dict(scoring_backend="vllm", scoring_max_num_batched_tokens=0),
            r"^scoring_max_num_batched_tokens must be None or >= 1, got 0",
        ),
        (
            dict(scoring_backend="vllm", scoring_gpu_memory_utilization=0.0),
            r"^scoring_gpu_memory_utilization must be None or in \(0, 1\], got 0.0",
        ),
        # Settings for an engine that will not run are refused, not silently ignored.
        (dict(max_num_seqs=8), r"--max-num-seqs configure the vLLM engine, but --backend is 'transformers'"),
        (
            dict(scoring_tensor_parallel_size=2, scoring_max_model_len=64),
            r"--scoring-tensor-parallel-size, --scoring-max-model-len .* --scoring-backend is 'transformers'",
        ),
    ],
)
def test_engine_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_engine_settings_reach_the_engine_configs():
    c = config(
        backend="vllm",
        scoring_backend="vllm",
        tensor_parallel_size=2,
        max_num_seqs=8,
        gpu_memory_utilization=0.5,
        max_model_len=512,
        scoring_tensor_parallel_size=4,
        scoring_max_num_seqs=16,
        scoring_max_model_len=1024,
        scoring_max_num_batched_tokens=4096,
    )
    assert engine_config(c).settings() == {
        "tensor_parallel_size": 2,
        "max_num_seqs": 8,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 512,
        "max_num_batched_tokens": None,  # vLLM's default
    }
    score = c.score_config()
    assert isinstance(score, ScoreConfig)
    scorer = engine_config(score, "scoring_").settings()
    # Unset utilization resolves to what vllm_backend hands the engine on this (GPU-less) machine.
    assert scorer == {
        "tensor_parallel_size": 4,
        "max_num_seqs": 16,
        "gpu_memory_utilization": 0.2,
        "max_model_len": 1024,
        "max_num_batched_tokens": 4096,
    }


def test_cli_refuses_bad_engine_settings(capsys):
    argv = ["score", "--rollouts", "r", "--teacher", "t", "--out", "o", "--scoring-max-num-seqs", "0"]
    assert lopd_main(argv) == 2
    assert "scoring_max_num_seqs must be None or >= 1, got 0" in capsys.readouterr().err


def test_transformers_store_records_no_engine(micro_store, tmp_path):
    manifest = open_store(micro_store).manifest
    assert "engine" in manifest.sampling and manifest.sampling["engine"] is None
    assert manifest.extra["scoring_backend"] == "transformers" and manifest.extra["scoring_engine"] is None
    # A store written before the settings were recorded (no such keys) stays readable and valid.
    old = tmp_path / "old"
    shutil.copytree(micro_store, old)
    data = json.loads((old / "manifest.json").read_text())
    del data["sampling"]["engine"], data["extra"]["scoring_engine"]
    (old / "manifest.json").write_text(json.dumps(data))
    assert open_store(old).manifest.sampling.get("engine") is None
    assert verify_store(old).ok


def test_header_checks_engine_records(micro_store):
    header = open_store(micro_store).manifest.header()
    assert header_problems(header) == []
    header["sampling"]["engine"] = {"tensor_parallel_size": 2}
    assert any("sampling.engine must be None or a dict" in p for p in header_problems(header))
    header["sampling"]["engine"] = None
    header["extra"]["scoring_engine"] = {
        "tensor_parallel_size": 0,
        "max_num_seqs": None,
        "gpu_memory_utilization": 0.9,
        "max_model_len": None,
    }
    assert header_problems(header) == [
        "extra.scoring_engine.tensor_parallel_size must be a positive number or None, got 0"
    ]
    # A 1.3 record (four keys, before max_num_batched_tokens) stays valid; a key a later version adds too.
    header["extra"]["scoring_engine"] = {
        "tensor_parallel_size": 1, "max_num_seqs": None, "gpu_memory_utilization": 0.9, "max_model_len": None,
    }  # fmt: skip
    assert header_problems(header) == []
    header["extra"]["scoring_engine"].update(max_num_batched_tokens=-1, from_a_later_version=3)
    assert header_problems(header) == [
        "extra.scoring_engine.max_num_batched_tokens must be a positive number or None, got -1"
    ]


def test_the_scorer_fits_its_step_to_the_vocabulary_and_the_memory_left_beside_vllm():
    """Issue 20: vLLM's prompt_logprobs takes ~6 B x tokens x vocabulary outside its memory profile."""
    from lightning_opd.stage1.scorer_memory import scoring_batched_tokens

    gib = 2**30
    # An 80 GiB GPU, all free, vLLM at 0.92: 6.4 GiB beside it, half for 152k-vocabulary logits.
    tokens, why = scoring_batched_tokens(152_064, 80 * gib, 80 * gib, 0.92)
    assert tokens == 3584 and 6 * tokens * 152_064 <= 3.2 * gib
    assert "3584 tokens x 152064 vocabulary = 3.0 GiB" in why and "--scoring-max-num-batched-tokens" in why
    assert scoring_batched_tokens(32_000, 80 * gib, 80 * gib, 0.5)[0] == 16384  # capped
    assert scoring_batched_tokens(262_144, 80 * gib, 10 * gib, 0.92)[0] == 512  # no headroom: the floor
