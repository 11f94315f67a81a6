"""Teacher scoring through a running vLLM OpenAI-compatible server (``--scoring-backend server``).

    lopd precompute ... --teacher runs/teacher-tokenizer --scoring-backend server --teacher-url http://host:8000

The student's token ids (prompt + sampled response) are sent as ids, never as text, to
``POST /v1/completions`` with ``max_tokens=1`` and ``prompt_logprobs=k``: vLLM answers, per prompt
position, the given token's log-prob (and rank) plus the top-k, the raw log-softmax of the logits as
the in-process scorers give. Only the standard library is used (urllib + json): no client to install.

``--teacher`` still names a local directory: its tokenizer is what the student's ids are checked
against (here and on the server, via ``/tokenize`` of the fingerprint probe) and its config makes it a
model directory; its weights are optional. Before any work (rollouts included) ``connect`` checks the
server answers, serves a tokenizer that encodes the probe as ours does, accepts the top-k (the
server's ``max_logprobs`` decides: the exact request is tried on a two-token prompt and a refusal is
reported with the cap it names), and behaves like the teacher it must be (``fingerprint.py``'s
behaviour fingerprint; the consistency gate in ``consistency.py``).

Faults: every request has a timeout and is retried with exponential backoff on connection errors,
timeouts and 429/5xx answers; other answers (4xx) are not retried. When the retries run out the run
stops with a ``TeacherServerError``; parts already committed stay, and a rerun resumes from them.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np

from lightning_opd.errors import ConfigError, InputError, TeacherServerError, TokenizerMismatchError
from lightning_opd.scoring import ScoredSequence

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 4
BACKOFF_BASE_S = 1.0  # waits 1, 2, 4, 8 ... s between tries, capped below
BACKOFF_MAX_S = 30.0
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # the server is busy or restarting
# Run settings that say where the teacher is served, not what it is: a rerun against another URL, or
# with other timeouts, resumes the same store (the manifest records the served model and its fingerprint).
SERVER_FIELDS = frozenset({"teacher_url", "teacher_timeout_s", "teacher_retries"})
# manifest.extra[SERVED_TEACHER_KEY] of a store scored here: {"model": the served name, "behavior":
# fingerprint.behavior_record}; next to "scoring_backend": "server" (docs/STORE.md).
SERVED_TEACHER_KEY = "teacher_server"
_CAP = re.compile(r"(?:max(?:imum)?[ _]?(?:allowed|logprobs)\D{0,20}?)(\d+)", re.IGNORECASE)


@dataclass(kw_only=True)
class ServerFlags:
    """The served teacher's flags of ``lopd precompute`` / ``lopd score`` (help in flag_help.py)."""

    teacher_url: str = ""
    teacher_timeout_s: float = DEFAULT_TIMEOUT_S
    teacher_retries: int = DEFAULT_RETRIES

    def check_server_flags(self) -> None:
        """The server flags go with ``--scoring-backend server`` and only with it."""
        if self.scoring_backend != "server":
            if self.teacher_url:
                raise ConfigError("--teacher-url scores through a server: pass --scoring-backend server too")
            return
        if not re.match(r"^https?://[^/\s]+", self.teacher_url):
            raise ConfigError(
                "--scoring-backend server needs --teacher-url http://HOST:PORT of a running vLLM server, got "
                f"{self.teacher_url!r}"
            )
        if not self.teacher_timeout_s > 0:
            raise ConfigError(f"teacher_timeout_s must be > 0, got {self.teacher_timeout_s}")
        if self.teacher_retries < 0:
            raise ConfigError(f"teacher_retries must be >= 0, got {self.teacher_retries}")


class ServerAnswer(Exception):
    """A non-retried HTTP error answer, with the server's own message (parsed by the caller)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _error_message(body: bytes) -> str:
    """vLLM's error text: ``{"error": {"message": ...}}`` (newer) or ``{"message": ...}`` (older)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(data.get("message", data)) if isinstance(data, dict) else str(data)


def backoff_s(attempt: int, base: float = BACKOFF_BASE_S) -> float:
    """Seconds to wait before try ``attempt + 1`` (0-based): doubling, capped at ``BACKOFF_MAX_S``."""
    return min(base * 2**attempt, BACKOFF_MAX_S)


class TeacherClient:
    """JSON over HTTP to one server, with a timeout per request and bounded, backed-off retries."""

    def __init__(
        self, url: str, *, timeout_s=DEFAULT_TIMEOUT_S, retries=DEFAULT_RETRIES, backoff=BACKOFF_BASE_S
    ):
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url  # /tokenize lives at the root
        self.timeout_s, self.retries, self.backoff = timeout_s, retries, backoff
        self.sleep = time.sleep  # tests count the waits instead of sleeping

    def request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(backoff_s(attempt - 1, self.backoff))
            req = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e.read())
                if e.code not in RETRY_STATUSES:
                    raise ServerAnswer(e.code, message) from None
                problem = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:  # a 200 whose body is not JSON: not a vLLM server
                raise TeacherServerError(
                    f"teacher server {self.url}{path} answered something that is not JSON ({e}); is "
                    "--teacher-url a vLLM OpenAI-compatible server?"
                ) from None
        raise TeacherServerError(
            f"teacher server {self.url} failed {path} {self.retries + 1} times (last: {problem}); parts "
            "committed so far are kept: restart the server (or raise --teacher-timeout-s/--teacher-retries) "
            "and rerun the same command to resume"
        )


@dataclass
class ServedModel:
    name: str  # the id /v1/models lists: what requests name, and what the manifest records
    max_model_len: int | None


def describe(client: TeacherClient) -> ServedModel:
    try:
        data = client.request("/v1/models").get("data") or []
    except ServerAnswer as e:
        raise TeacherServerError(
            f"{client.url}/v1/models refused ({e}); is it a vLLM OpenAI server?"
        ) from None
    if not data:
        raise TeacherServerError(f"teacher server {client.url} serves no model; start it with --model DIR")
    first = data[0]  # vLLM lists the base model first (LoRA adapters after it)
    return ServedModel(name=str(first["id"]), max_model_len=first.get("max_model_len"))


def check_tokenizer(client: TeacherClient, model: ServedModel, tokenizer, text: str, teacher: str) -> None:
    """The server must encode ``text`` into the ids ``tokenizer`` gives: one id must mean one string."""
    ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    try:
        theirs = client.request(
            "/tokenize", {"model": model.name, "prompt": text, "add_special_tokens": False}
        )
    except ServerAnswer as e:
        raise TeacherServerError(
            f"{client.url}/tokenize refused ({e}); serve the teacher with vLLM"
        ) from None
    if list(theirs.get("tokens") or []) != ours:
        raise TokenizerMismatchError(
            f"the teacher server {client.url} ({model.name}) tokenises differently from --teacher {teacher} "
            f"(probe {text[:20]!r}...: {theirs.get('tokens', [])[:6]}... vs {ours[:6]}...); serve the teacher "
            "whose tokenizer --teacher holds, or point --teacher at the served model's tokenizer"
        )


def completions_body(model: ServedModel, sequences: Sequence[Sequence[int]], topk: int) -> dict:
    return {
        "model": model.name,
        "prompt": [list(map(int, s)) for s in sequences],  # ids as ids: nothing is re-tokenised
        "max_tokens": 1,  # vLLM must generate something; that token is ignored
        "temperature": 0.0,
        "prompt_logprobs": topk,
    }


def named_cap(message: str) -> int | None:
    """The cap a refusal names: vLLM 0.32 says "... greater than max allowed: 20 (parameter=...)"."""
    found = _CAP.search(message)
    return int(found.group(1)) if found else None


def check_topk(client: TeacherClient, model: ServedModel, probe: list[int], topk: int) -> None:
    """Refuse a top-k above the server's ``max_logprobs`` before any work, naming the cap.

    The exact request the run will make is tried on a two-token prompt: the server's own check
    decides (vLLM publishes its cap nowhere else: not in /v1/models), so no version's default is
    guessed; the cap is read out of the refusal's message when it names one.
    """
    try:
        client.request("/v1/completions", completions_body(model, [probe[:2]], topk))
    except ServerAnswer as e:
        found = named_cap(e.message)
        cap = "its max_logprobs" if found is None else f"max_logprobs={found}"
        raise ConfigError(
            f"--topk {topk} is above what the teacher server {client.url} allows ({cap}; it said: "
            f"{e.message.strip()[:160]}); lower --topk, or restart the server with --max-logprobs {topk}"
        ) from None


def parse_prompt_logprobs(entries, prompt_len: int, response: Sequence[int], topk: int) -> ScoredSequence:
    """Response rows of one choice's ``prompt_logprobs``.

    Layout (vLLM 0.32's OpenAI server): one entry per prompt position, ``None`` at position 0, else a
    dict ``{token id: {"logprob", "rank", ...}}`` holding the given token and the top-k; the given
    token is one of the k when it ranks among them, so an entry has k or k + 1 items. Checked, not assumed.
    """
    total = prompt_len + len(response)
    if not isinstance(entries, list) or len(entries) != total:
        raise TeacherServerError(
            f"the teacher server returned {len(entries) if isinstance(entries, list) else 'no'} prompt log-probs "
            f"for {total} tokens; is it a vLLM server that supports prompt_logprobs?"
        )
    logprobs = np.zeros(len(response), np.float32)
    ids = np.zeros((len(response), topk), np.int32)
    top = np.zeros((len(response), topk), np.float32)
    for t, token in enumerate(response):
        entry = entries[prompt_len + t]
        items = {int(k): v for k, v in (entry or {}).items()}
        if int(token) not in items or len(items) not in (topk, topk + 1):
            raise TeacherServerError(
                f"the teacher server's prompt log-probs at position {prompt_len + t} do not hold the given token "
                f"{token} and the top-{topk} ({sorted(items)[:8]}); unsupported server or output format"
            )
        logprobs[t] = items[int(token)]["logprob"]
        if topk:
            if len(items) == topk + 1:  # the given token ranks below the k: not one of them
                items.pop(int(token))
            ranked = sorted(items.items(), key=lambda kv: kv[1]["rank"])
            ids[t] = [k for k, _ in ranked]
            top[t] = [v["logprob"] for _, v in ranked]
    return ScoredSequence(logprobs, ids, top) if topk else ScoredSequence(logprobs)


def score_batch(client, model: ServedModel, prompts, responses, topk: int) -> list[ScoredSequence]:
    """One request for these sequences; results in input order (choices carry their index)."""
    body = completions_body(model, [list(p) + list(r) for p, r in zip(prompts, responses)], topk)
    try:
        choices = client.request("/v1/completions", body).get("choices") or []
    except ServerAnswer as e:
        raise TeacherServerError(f"the teacher server {client.url} refused a scoring request ({e})") from None
    by_index = {int(c["index"]): c for c in choices}
    if sorted(by_index) != list(range(len(prompts))):
        raise TeacherServerError(
            f"the teacher server answered {len(choices)} choices for {len(prompts)} prompts; unsupported server"
        )
    return [
        parse_prompt_logprobs(by_index[i].get("prompt_logprobs"), len(p), r, topk)
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]


def plan_requests(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive indices per request, up to ``max_tokens`` tokens each (a longer sequence goes alone).

    In input order and fixed by the lengths alone: a resumed part sends the very requests an
    uninterrupted run sends, so the server batches (and rounds) them the same way.
    """
    batches, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return batches + ([current] if current else [])


@dataclass
class ServedTeacher:
    """A checked connection: ``score`` for ``run_scoring``, and what the manifest records."""

    client: TeacherClient
    model: ServedModel
    behavior: dict  # fingerprint.behavior_record of the server's probe log-probs
    max_tokens_per_request: int

    def manifest_record(self) -> dict:
        return {"model": self.model.name, "behavior": self.behavior}

    def score(self, prompts, responses, topk: int) -> list[ScoredSequence]:
        results: list[ScoredSequence | None] = [None] * len(prompts)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if len(p) == 0 and len(r):
                raise InputError(f"sequence {i} has an empty prompt: its first token would have no context")
            # The server generates one token after the scored sequence: it needs that position too.
            limit = self.model.max_model_len
            if limit and len(p) + len(r) + 1 > limit:
                raise InputError(
                    f"sequence {i} has {len(p) + len(r)} tokens; the teacher server's max_model_len is {limit} "
                    "and scoring needs one more: restart the server with a larger --max-model-len"
                )
        todo = [i for i, r in enumerate(responses) if len(r)]
        for batch in plan_requests(
            [len(prompts[i]) + len(responses[i]) for i in todo], self.max_tokens_per_request
        ):
            idx = [todo[j] for j in batch]
            scored = score_batch(
                self.client, self.model, [prompts[i] for i in idx], [responses[i] for i in idx], topk
            )
            for i, s in zip(idx, scored):
                results[i] = s
        return [s if s is not None else parse_prompt_logprobs([None], 1, [], topk) for s in results]


def connect(config, log=print) -> ServedTeacher:
    """Check the server against ``config.teacher`` (tokenizer, top-k cap) and take its behaviour record."""
    from lightning_opd.models.fingerprint import PROBE_TEXT, behavior_record, probe_ids
    from lightning_opd.models.loading import check_model_dir, load_tokenizer

    check_model_dir(config.teacher)
    tokenizer = load_tokenizer(config.teacher)
    client = TeacherClient(
        config.teacher_url, timeout_s=config.teacher_timeout_s, retries=config.teacher_retries
    )
    model = describe(client)
    check_tokenizer(client, model, tokenizer, PROBE_TEXT, str(Path(config.teacher)))
    probe = probe_ids(tokenizer)
    check_topk(client, model, probe, config.topk)
    scored = score_batch(client, model, [probe[:1]], [probe[1:]], 0)[0]
    served = ServedTeacher(
        client, model, behavior_record(scored.logprobs.tolist()), config.max_tokens_per_batch
    )
    log(
        f"stage 1 scoring: teacher server {client.url} serves {model.name} ({served.behavior['fingerprint']})"
    )
    return served


def preflight(config, student_path: str, log=print) -> None:
    """``lopd precompute``: every check of a served teacher before the rollouts (no-op otherwise)."""
    if config.scoring_backend == "server":
        from lightning_opd.models.consistency import served_identity

        served_identity(config, connect(config, log), student_path, log)
