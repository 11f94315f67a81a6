"""The served-teacher client without a server: response parsing, retries and backoff (against a tiny
local stub, for the retry policy only), flag validation, and the behaviour fingerprint's rounding.
End to end against a real vLLM server: tests/test_vllm_server.py."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lightning_opd.errors import ConfigError, TeacherServerError
from lightning_opd.models.fingerprint import (
    BEHAVIOR_TOLERANCE,
    behavior_distance,
    behavior_fingerprint,
    behavior_record,
    probe_ids,
    same_behavior,
)
from lightning_opd.stage1.served import (
    BACKOFF_MAX_S,
    ServerAnswer,
    TeacherClient,
    backoff_s,
    named_cap,
    parse_prompt_logprobs,
    plan_requests,
)


def entry(*items):
    """One position of vLLM's prompt_logprobs: (token id, log-prob, rank) triples."""
    return {str(t): {"logprob": lp, "rank": r, "decoded_token": "x"} for t, lp, r in items}


def test_parse_given_token_inside_and_outside_the_top_k():
    # prompt [9, 4], response [7, 3]: positions 0 (null), 1 (token 4), 2 (token 7), 3 (token 3)
    entries = [
        None,
        entry((4, -0.5, 1), (8, -1.5, 2)),
        entry((7, -3.0, 5), (2, -0.2, 1), (5, -1.9, 2)),  # 7 ranks 5th: one extra item
        entry((1, -1.0, 2), (3, -0.7, 1)),  # 3 is the top-1: k items, listed out of rank order
    ]
    scored = parse_prompt_logprobs(entries, 2, [7, 3], topk=2)
    np.testing.assert_allclose(scored.logprobs, [-3.0, -0.7])
    assert scored.topk_ids.tolist() == [[2, 5], [3, 1]]
    np.testing.assert_allclose(scored.topk_logprobs, [[-0.2, -1.9], [-0.7, -1.0]])
    assert scored.logprobs.dtype == np.float32 and scored.topk_ids.dtype == np.int32
    plain = parse_prompt_logprobs([None, entry((4, -0.5, 1)), entry((7, -3.0, 5))], 2, [7], topk=0)
    assert plain.topk_ids is None and plain.logprobs.tolist() == [-3.0]


@pytest.mark.parametrize(
    "entries",
    [
        [None, entry((4, -0.5, 1))],  # one position short
        [None, entry((4, -0.5, 1)), entry((6, -0.1, 1), (2, -0.2, 2))],  # the given token is missing
        [None, entry((4, -0.5, 1)), entry((7, -0.1, 1), (2, -0.2, 2), (3, -0.3, 3))],  # too many items
        None,
    ],
)
def test_parse_refuses_what_is_not_vllms_layout(entries):
    with pytest.raises(TeacherServerError):
        parse_prompt_logprobs(entries, 2, [7], topk=1)


def test_requests_keep_input_order_within_the_token_budget():
    assert plan_requests([10, 10, 10, 50, 5], 25) == [[0, 1], [2], [3], [4]]
    assert plan_requests([], 25) == []


def test_the_cap_is_read_from_vllms_refusal():
    message = "Requested prompt logprobs of 25, which is greater than max allowed: 20 (parameter=prompt_logprobs, value=25)"
    assert named_cap(message) == 20
    assert named_cap("some other refusal") is None


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(a) for a in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_s(20) == BACKOFF_MAX_S


class Stub(BaseHTTPRequestHandler):
    """Answers with ``script``'s next (status, body, delay) and counts the hits."""

    script: list = []
    hits = 0

    def do_POST(self):
        type(self).hits += 1
        status, body, delay = self.script.pop(0) if self.script else (200, {"ok": True}, 0)
        time.sleep(delay)
        payload = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Stub.hits = 0
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def client(url, retries, timeout_s=5.0):
    c = TeacherClient(url + "/v1/", timeout_s=timeout_s, retries=retries)
    c.waits = []
    c.sleep = c.waits.append  # record the backoff instead of sleeping
    return c


def test_busy_answers_are_retried_with_backoff(stub):
    _, url = stub
    Stub.script = [
        (503, {"error": {"message": "busy"}}, 0),
        (500, {"message": "oops"}, 0),
        (200, {"x": 1}, 0),
    ]
    c = client(url, retries=3)
    assert c.request("/v1/completions", {}) == {"x": 1}
    assert Stub.hits == 3 and c.waits == [1.0, 2.0]


def test_retries_run_out_into_a_typed_error_that_says_how_to_resume(stub):
    _, url = stub
    Stub.script = [(503, {"error": {"message": "busy"}}, 0)] * 3
    c = client(url, retries=2)
    with pytest.raises(
        TeacherServerError, match=r"failed /v1/completions 3 times \(last: HTTP 503: busy\).*rerun"
    ):
        c.request("/v1/completions", {})
    assert Stub.hits == 3 and c.waits == [1.0, 2.0]


def test_a_refusal_is_not_retried(stub):
    _, url = stub
    Stub.script = [(400, {"error": {"message": "max allowed: 20"}}, 0)]
    with pytest.raises(ServerAnswer) as refused:
        client(url, retries=3).request("/v1/completions", {})
    assert refused.value.status == 400 and refused.value.message == "max allowed: 20" and Stub.hits == 1


def test_a_request_that_times_out_is_retried(stub):
    _, url = stub
    Stub.script = [(200, {"late": True}, 1.0), (200, {"x": 2}, 0)]
    c = client(url, retries=1, timeout_s=0.3)
    assert c.request("/v1/completions", {}) == {"x": 2}
    assert c.waits == [1.0]


def test_no_server_at_all_is_a_typed_error(stub):
    server, url = stub
    server.shutdown()
    server.server_close()
    with pytest.raises(TeacherServerError, match="failed /v1/models 2 times"):
        client(url, retries=1).request("/v1/models")


def test_server_flags_are_checked(tmp_path):
    from pipelines.precompute import ScoreConfig

    base = dict(rollouts=str(tmp_path), teacher=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="pass --scoring-backend server"):
        ScoreConfig(**base, teacher_url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="needs --teacher-url"):
        ScoreConfig(**base, scoring_backend="server")
    with pytest.raises(ConfigError, match="teacher_retries"):
        ScoreConfig(**base, scoring_backend="server", teacher_url="http://127.0.0.1:1", teacher_retries=-1)
    with pytest.raises(ConfigError, match="configure the vLLM engine"):
        ScoreConfig(**base, scoring_backend="server", teacher_url="http://h:1", scoring_max_num_seqs=4)
    ScoreConfig(**base, scoring_backend="server", teacher_url="http://127.0.0.1:8000")


def test_fingerprint_rounding_absorbs_backend_noise_and_sees_another_model():
    rng = np.random.default_rng(0)
    values = -rng.uniform(0, 10, 31)
    values = np.round(values, 2) + 0.003  # keep clear of the rounding boundaries (x.xx5)
    noisy = values + rng.uniform(-2e-6, 2e-6, values.shape)  # fp32 kernels: ~1e-6 apart
    assert behavior_fingerprint(values) == behavior_fingerprint(noisy)
    assert behavior_fingerprint([-0.001, -1.0]) == behavior_fingerprint([0.001, -1.0])  # -0.00 is 0.00
    moved = values.copy()
    moved[7] += 0.02
    assert behavior_fingerprint(values) != behavior_fingerprint(moved)


def test_a_value_next_to_a_rounding_boundary_still_matches_within_the_tolerance():
    a = behavior_record([-1.00499999, -2.0])
    b = behavior_record([-1.00500001, -2.0])  # rounds to -1.01 where a rounds to -1.00
    assert a["fingerprint"] != b["fingerprint"] and same_behavior(a, b)
    far = behavior_record([-1.0 - 2 * BEHAVIOR_TOLERANCE, -2.0])
    assert not same_behavior(a, far)
    assert behavior_distance(a, behavior_record([-1.0])) == float("inf")  # another probe: no match


def test_the_probe_is_the_tokenizer_s(char_tokenizer):
    ids = probe_ids(char_tokenizer)
    assert 2 <= len(ids) <= 32 and char_tokenizer.unk_token_id not in ids


def test_the_gate_compares_a_served_behaviour_with_the_sft_teacher_s(
    sft_student_dir, micro_teacher_dir, micro_student_dir, tmp_path
):
    from dataclasses import asdict

    from lightning_opd.errors import TeacherConsistencyError
    from lightning_opd.models.consistency import behavior_consistency
    from lightning_opd.models.fingerprint import local_behavior, model_fingerprint
    from lightning_opd.models.loading import model_identity
    from lightning_opd.models.provenance import Provenance, write_provenance

    teacher, other = local_behavior(micro_teacher_dir), local_behavior(micro_student_dir)
    # No record in this provenance: computed from the SFT teacher's weights at the provenance's path.
    section = behavior_consistency(student_path=str(sft_student_dir), served=teacher, where="the server")
    assert section["consistent"] is True
    assert section["sft_teacher_fingerprint"] == model_fingerprint(micro_teacher_dir)
    with pytest.raises(
        TeacherConsistencyError, match="the server does not behave like the student's SFT teacher"
    ):
        behavior_consistency(student_path=str(sft_student_dir), served=other, where="the server")
    allowed = behavior_consistency(
        student_path=str(sft_student_dir),
        served=other,
        where="the server",
        allow_inconsistent=True,
        log=print,
    )
    assert allowed["consistent"] is False and allowed["allowed"] is True
    # A record written by stage zero is used as it is: the SFT teacher's weights need not exist any more.
    student = tmp_path / "student"
    student.mkdir()
    gone = {**asdict(model_identity(micro_teacher_dir)), "path": str(tmp_path / "gone"), "behavior": teacher}
    write_provenance(student, Provenance("sft", "fp1:x", "tok1:x", sft_teacher=gone))
    assert behavior_consistency(student_path=str(student), served=teacher, where="s")["consistent"] is True
    with pytest.raises(TeacherConsistencyError):
        behavior_consistency(student_path=str(student), served=other, where="s")
