"""Teacher scoring through a real vLLM OpenAI-compatible server (``--scoring-backend server``).

Run in the vLLM environment only (``make test-vllm``):

    .venv-vllm/bin/python -m pytest -q -m vllm tests/test_vllm_server.py -p no:cacheprovider

One server of the tiny teacher on 127.0.0.1 (a free port), module-scoped: starting it is the cost
(~40 s on two cores). The kill-and-resume test stops it the hard way and starts it again on the
same port. Tolerance as in test_vllm.py: both sides run the same fp32 weights (measured ~2e-6).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_lopd
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from lightning_opd.errors import (
    ConfigError,
    TeacherConsistencyError,
    TeacherServerError,
    TokenizerMismatchError,
)
from lightning_opd.models.fingerprint import local_behavior
from lightning_opd.models.loading import model_identity
from lightning_opd.models.provenance import Provenance, write_provenance
from lightning_opd.scoring import score_sequences
from lightning_opd.toy.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from pipelines import precompute  # noqa: E402

TOLERANCE = 1e-4
TOPK = 5
READY_TIMEOUT_S = 300


def _save_qwen2(path, seed, tokenizer=None, layers=2):
    """A 64-wide Qwen2 (vLLM's CPU attention has no kernel for the micro spec's head_dim 16)."""
    tokenizer = tokenizer or build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)  # peaked, context-dependent distributions
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _sft_student(path, teacher_dir, seed=5):
    """A student whose provenance names ``teacher_dir`` as its SFT teacher (as stage zero writes)."""
    _save_qwen2(path, seed, layers=1)
    ident = model_identity(path)
    write_provenance(
        path,
        Provenance(
            stage="sft",
            model_fingerprint=ident.fingerprint,
            tokenizer_fingerprint=ident.tokenizer_fingerprint,
            sft_teacher=asdict(model_identity(teacher_dir)),
        ),
    )
    return path


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group (its engine runs in a
    child process), stopped by that group's id only."""

    def __init__(self, model_dir, port, log_path):
        self.model_dir, self.port, self.log_path, self.proc = str(model_dir), port, log_path, None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "128",
            "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(64 * 2**20),
            "--max-logprobs", "20", "--enforce-eager",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM server not ready after {READY_TIMEOUT_S} s; see {self.log_path}")

    def stop(self, hard=False):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    teacher = _save_qwen2(root / "teacher", seed=0)
    other = _save_qwen2(root / "other_teacher", seed=7)
    from lightning_opd.prompts import write_jsonl
    from lightning_opd.toy.task import sample_problems, to_records

    prompts = root / "opd.jsonl"
    write_jsonl(to_records(sample_problems("opd", 12, digits=(1, 2)), with_solution=True), prompts)
    return {
        "root": root,
        "teacher": teacher,
        "other": other,
        "student": _sft_student(root / "student", teacher),
        "other_student": _sft_student(root / "other_student", other),
        "prompts": prompts,
    }


@pytest.fixture(scope="module")
def server(dirs):
    server = Server(dirs["teacher"], _free_port(), dirs["root"] / "server.log")
    server.start()
    yield server
    server.stop()


def _config(dirs, server, out, **overrides):
    settings = dict(
        student=str(dirs["student"]),
        teacher=str(dirs["teacher"]),
        prompts=str(dirs["prompts"]),
        out=str(out),
        max_new_tokens=12,
        part_size=4,
        backend="transformers",
        temperature=1.0,
        seed=3,
        topk=TOPK,
        scoring_backend="server",
        teacher_url=server.url + "/v1",
        teacher_timeout_s=10.0,
        teacher_retries=1,
        max_tokens_per_batch=40,  # a part of 4 rows is 2-3 requests: a kill can land inside a part
    )
    settings.update(overrides)
    return precompute.PrecomputeConfig(**settings)


def _rows(store):
    files = sorted(p for p in (store / "data").rglob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample_index"]))


@pytest.fixture(scope="module")
def served_store(dirs, server):
    out = dirs["root"] / "store_a"
    precompute.run(_config(dirs, server, out), log=lambda *_: None)
    return out


def test_stored_logprobs_match_the_in_process_scorer(served_store, dirs, server):
    rows = _rows(served_store)
    assert len(rows) == 12
    model = AutoModelForCausalLM.from_pretrained(dirs["teacher"], dtype=torch.float32).eval()
    ref = score_sequences(
        model, [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], topk=TOPK
    )
    for row, want in zip(rows, ref):
        np.testing.assert_allclose(row["teacher_logprobs"], want.logprobs, atol=TOLERANCE, rtol=0)
        np.testing.assert_array_equal(np.array(row["teacher_topk_ids"]), want.topk_ids)
        np.testing.assert_allclose(np.array(row["teacher_topk_logprobs"]), want.topk_logprobs, atol=TOLERANCE)
    manifest = json.loads((served_store / "manifest.json").read_text())
    extra = manifest["extra"]
    assert extra["scoring_backend"] == "server" and extra["scoring_engine"] is None
    assert extra["teacher_server"]["model"] == str(dirs["teacher"])
    # The behaviour fingerprint from the server equals the one from the local fp32 weights.
    local = local_behavior(dirs["teacher"])
    assert extra["teacher_server"]["behavior"]["fingerprint"] == local["fingerprint"]
    diffs = np.abs(
        np.subtract(extra["teacher_server"]["behavior"]["probe_logprobs"], local["probe_logprobs"])
    )
    assert diffs.max() <= 1e-4
    assert manifest["teacher_consistency"]["consistent"] is True
    assert manifest["teacher"]["fingerprint"] == model_identity(dirs["teacher"]).fingerprint


def test_a_server_killed_mid_part_loses_that_part_only_and_a_rerun_gives_the_same_store(
    served_store, dirs, server, monkeypatch
):
    from lightning_opd.stage1 import served as served_module

    out = dirs["root"] / "store_b"
    config = _config(dirs, server, out, allow_duplicate=True)  # store_a has this content id already
    real = served_module.score_batch
    after_commit = {"calls": 0}

    def dying_server(client, model, prompts, responses, topk):
        # Once part 0 is committed, the second request of part 1 (two or more at a 40-token budget)
        # finds the server dead: part 1 is half scored when it goes.
        if list((out / "commits").glob("part-*.json")):
            after_commit["calls"] += 1
            if after_commit["calls"] == 2:
                server.stop(hard=True)
        return real(client, model, prompts, responses, topk)

    monkeypatch.setattr(served_module, "score_batch", dying_server)
    monkeypatch.setattr(served_module, "backoff_s", lambda attempt, base=0: 0.1)
    with pytest.raises(TeacherServerError, match="rerun the same command to resume"):
        precompute.run(config, log=lambda *_: None)
    committed = sorted(p.name for p in (out / "commits").glob("part-*.json"))
    assert len(committed) == 1 and after_commit["calls"] == 2, committed  # died inside part 1
    monkeypatch.setattr(served_module, "score_batch", real)
    server.start()
    precompute.run(config, log=lambda *_: None)
    a, b = _rows(served_store), _rows(out)
    assert a == b  # every column of every row, teacher log-probs and top-k included, bit for bit


def test_a_top_k_above_the_server_cap_is_refused_before_any_work(dirs, server, tmp_path):
    out = tmp_path / "store"
    with pytest.raises(ConfigError, match=r"max_logprobs=20.*--max-logprobs 21"):
        precompute.run(_config(dirs, server, out, topk=21), log=lambda *_: None)
    assert not (out / "_rollouts").exists()  # no rollouts were sampled


def test_a_server_of_another_model_is_refused_in_one_line(dirs, server, tmp_path):
    # --teacher names weights that are not what the server serves: refused before any rollout.
    out = tmp_path / "store"
    result = run_lopd(
        "precompute", "--student", dirs["other_student"], "--teacher", dirs["other"], "--prompts",
        dirs["prompts"], "--out", out, "--backend", "transformers", "--max-new-tokens", "4",
        "--scoring-backend", "server", "--teacher-url", server.url, "--teacher-retries", "0",
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    # The error is the last line, and one line (transformers' progress bars may come before it).
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("lopd precompute: error: ") and "serves another model than --teacher" in message
    assert not (out / "_rollouts").exists()


def test_a_served_teacher_that_is_not_the_sft_teacher_is_refused(dirs, server, tmp_path):
    # --teacher holds only the tokenizer and config: the behaviour fingerprint is compared with the
    # SFT teacher's (computed from its weights, the provenance's path).
    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer_only.mkdir()
    for f in dirs["teacher"].glob("*.json"):
        (tokenizer_only / f.name).write_bytes(f.read_bytes())
    config = _config(
        dirs, server, tmp_path / "bad", student=str(dirs["other_student"]), teacher=str(tokenizer_only)
    )
    with pytest.raises(TeacherConsistencyError, match="does not behave like the student's SFT teacher"):
        precompute.run(config, log=lambda *_: None)
    # ... and the right one passes the gate with the behaviour fingerprint as the teacher's identity.
    ok = tmp_path / "ok"
    precompute.run(
        _config(dirs, server, ok, teacher=str(tokenizer_only), allow_duplicate=True), log=lambda *_: None
    )
    manifest = json.loads((ok / "manifest.json").read_text())
    assert manifest["teacher"]["fingerprint"].startswith("bfp1:")
    assert manifest["teacher_consistency"]["consistent"] is True


def test_a_server_with_another_tokenizer_is_refused(dirs, server, tmp_path):
    chars = build_char_tokenizer()
    vocab = chars.get_vocab()
    # The same characters under other ids (digits swapped): another tokenizer, the same special tokens.
    swapped = {t: (i if not t.isdigit() else vocab[str(9 - int(t))]) for t, i in vocab.items()}
    from tokenizers import Tokenizer, decoders, models

    backend = Tokenizer(models.BPE(vocab=swapped, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    other = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    teacher = tmp_path / "swapped"
    teacher.mkdir()
    (teacher / "config.json").write_bytes((dirs["teacher"] / "config.json").read_bytes())
    other.save_pretrained(teacher)
    with pytest.raises(TokenizerMismatchError, match="tokenises differently from --teacher"):
        precompute.run(_config(dirs, server, tmp_path / "s", teacher=str(teacher)), log=lambda *_: None)
