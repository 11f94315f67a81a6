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

from lightning_opd.errors import InputError


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    prompt: str
    answer: str | None = None
    solution: str | None = None


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
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno} is not valid JSON ({e.msg})") from e
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
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


def encode_prompt(tokenizer, text: str, chat_template: str = "auto") -> list[int]:
    """Token ids for one prompt; with a chat template (when the tokenizer has one, or 'always')."""
    use_template = chat_template == "always" or (
        chat_template == "auto" and getattr(tokenizer, "chat_template", None)
    )
    if use_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
