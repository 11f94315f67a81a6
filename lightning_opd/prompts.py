"""Prompt sets: one loader for every stage.

A prompt set is a JSONL file, a Parquet file, or a Hugging Face ``datasets`` directory (made by
``save_to_disk``), with a prompt field and optionally an id, a reference answer and a gold solution.
Chat models get their chat template applied when encoding (``chat_template="auto"``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lightning_opd.errors import ConfigError, InputError


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    prompt: str
    answer: str | None = None
    solution: str | None = None


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_rows(path: Path) -> list[dict]:
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise InputError(f"{path} is a directory but not a Hugging Face dataset saved with save_to_disk")
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take the one split, or refuse to guess
            splits = list(dataset.keys())
            if len(splits) != 1:
                raise InputError(
                    f"{path} holds splits {splits}; save the one split you want with save_to_disk"
                )
            dataset = dataset[splits[0]]
        return list(dataset)
    if path.suffix == ".jsonl":
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{lineno} is not valid JSON ({e.msg})") from e
                    if not isinstance(row, dict):
                        raise InputError(
                            f"{path}:{lineno} is a JSON {_json_type(row)}, not an object; each line must be "
                            'an object such as {"prompt": "..."}'
                        )
                    rows.append(row)
        except UnicodeDecodeError as e:
            raise InputError(
                f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8"
            ) from None
        return rows
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise InputError(
                f"{path} is not a readable Parquet file ({e}); pass a .parquet table with a prompt column"
            ) from None
    raise InputError(f"{path}: prompt sets must be .jsonl, .parquet or a datasets directory")


def load_prompts(
    source: str | Path,
    *,
    prompt_field: str = "prompt",
    id_field: str = "prompt_id",
    answer_field: str = "answer",
    solution_field: str = "solution",
    limit: int | None = None,
) -> list[PromptRecord]:
    path = Path(source)
    if not path.exists():
        raise InputError(f"prompt set {path} does not exist")
    rows = _read_rows(path)
    if not rows:
        raise InputError(
            f"prompt set {path} is empty; it needs at least one row with a {prompt_field!r} field"
        )
    records, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):  # e.g. a datasets directory of bare values
            raise InputError(f"prompt set {path}, row {i}: expected a record with fields, got {row!r:.60}")
        if prompt_field not in row or not isinstance(row[prompt_field], str):
            raise InputError(
                f"prompt set {path}, row {i}: missing text field {prompt_field!r} (fields: {sorted(row)}); "
                "pass --prompt-field to name the prompt column"
            )
        prompt_id = str(row[id_field]) if row.get(id_field) is not None else f"row-{i}"
        if prompt_id in seen:
            raise InputError(
                f"prompt set {path}: duplicate {id_field} {prompt_id!r} (row {i}); ids must be unique"
            )
        seen.add(prompt_id)
        answer = row.get(answer_field)
        solution = row.get(solution_field)
        records.append(
            PromptRecord(
                prompt_id=prompt_id,
                prompt=row[prompt_field],
                answer=None if answer is None else str(answer),
                solution=None if solution is None else str(solution),
            )
        )
    return records[:limit] if limit else records


def write_jsonl(records: list[PromptRecord] | list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            row = r if isinstance(r, dict) else {k: v for k, v in r.__dict__.items() if v is not None}
            f.write(json.dumps(row) + "\n")
    return path


def prompt_set_hash(records: list[PromptRecord]) -> str:
    """Content hash of a prompt set (ids, prompts, answers): the store's prompt-set identity."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt_id, r.prompt, r.answer, r.solution]).encode())
    return "ps1:" + h.hexdigest()[:32]


CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def check_chat_template_mode(mode: str) -> None:
    """Refuse a ``--chat-template`` value that is not one of CHAT_TEMPLATE_MODES (a typo must not mean 'never')."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ConfigError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")


def unencodable(tokenizer, text: str) -> str | None:
    """The first character of ``text`` that ``tokenizer`` cannot encode, or None when it encodes it all.

    A tokenizer either maps such a character to its unknown token or drops it without a word (the
    character then lies under no token's offsets); whitespace a tokenizer normalises away is fine.
    """
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers have no offsets
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return "?" if unk_id is not None and unk_id in ids and not (unk and unk in text) else None
    covered = [False] * len(text)
    for token_id, (start, end) in zip(encoding["input_ids"], offsets):
        if token_id == unk_id and not (unk and unk in text[start:end]):
            return text[start:end] or "?"
        covered[start:end] = [True] * (end - start)
    return next((c for c, seen in zip(text, covered) if not seen and not c.isspace()), None)


def encode_prompt(tokenizer, text: str, chat_template: str = "auto") -> list[int]:
    """Token ids for one prompt; with a chat template (when the tokenizer has one, or 'always')."""
    check_chat_template_mode(chat_template)
    use_template = chat_template == "always" or (
        chat_template == "auto" and getattr(tokenizer, "chat_template", None)
    )
    if use_template:
        # The template writes its own special tokens (Gemma's <bos> included): none added on top.
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Without a template: BOS exactly when the tokenizer itself would add one (Gemma and Llama do,
    # Qwen and the toy do not; a model trained with BOS degrades without it), and never an EOS, which
    # some tokenizers append by default and which would end the prompt.
    # Whether it would is a property of the tokenizer, not of the text: probed on "" (no second
    # encoding of every prompt).
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("")["input_ids"][:1] == [bos] and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids
