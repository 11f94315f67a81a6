"""The toy task's teacher, prompt sets and student initialisation, cached on disk.

The teacher is trained from scratch on gold worked solutions (the ``teacher`` split) until it passes
the accuracy bar; the result is cached under a key derived from everything that determines it (model
spec, data, steps, seed), so later runs reuse it instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_opd.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from lightning_opd.models.provenance import Provenance, write_provenance
from lightning_opd.prompts import write_jsonl
from lightning_opd.stage0.sft import SFTExample, SFTTrainConfig, train_sft
from lightning_opd.toy.models import STUDENT_SPEC, TEACHER_SPEC, ToyModelSpec, build_model
from lightning_opd.toy.task import sample_problems, to_records, worked_solution
from lightning_opd.toy.tokenizer import build_char_tokenizer


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOPD_CACHE", Path.cwd() / ".cache" / "lightning-opd"))


@dataclass(frozen=True)
class ToyTeacherRecipe:
    spec: ToyModelSpec = TEACHER_SPEC
    digits: tuple[int, ...] = (1, 2, 3)
    num_problems: int = 60_000
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    style: str = "columns"  # the worked-solution style it is trained on (toy.task.SOLUTION_STYLES)

    def key(self) -> str:
        fields = asdict(self)
        if self.style == "columns":
            del fields["style"]  # the default style keeps the cache key teachers had before styles existed
        payload = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def gold_examples(
    tokenizer, split: str, n: int, digits, seed: int, style: str = "columns"
) -> list[SFTExample]:
    problems = sample_problems(split, n, digits=digits, seed=seed)
    eos = tokenizer.eos_token_id
    return [
        SFTExample(
            tokenizer(p.prompt)["input_ids"],
            tokenizer(worked_solution(p.a, p.b, style))["input_ids"] + [eos],
        )
        for p in problems
    ]


def ensure_toy_teacher(
    recipe: ToyTeacherRecipe = ToyTeacherRecipe(), cache_dir: Path | None = None, log=print
) -> Path:
    """Path of a trained toy teacher for ``recipe``, training it (minutes) only when not cached."""
    style = "" if recipe.style == "columns" else f"-{recipe.style}"
    out = (cache_dir or default_cache_dir()) / f"toy-teacher-{recipe.spec.describe()}{style}-{recipe.key()}"
    if (out / "lopd_provenance.json").exists():
        log(f"toy teacher: reusing cached {out}")
        return out
    log(
        f"toy teacher: training {recipe.spec.describe()} for {recipe.steps} steps (cached afterwards at {out})"
    )
    torch.manual_seed(recipe.seed)
    tokenizer = build_char_tokenizer()
    model = build_model(recipe.spec, tokenizer, seed=recipe.seed)
    examples = gold_examples(
        tokenizer, "teacher", recipe.num_problems, recipe.digits, recipe.seed, recipe.style
    )
    start = time.time()
    config = SFTTrainConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        warmup_steps=min(20, recipe.steps // 10),
    )
    train_sft(model, examples, config, pad_id=tokenizer.pad_token_id, log=log)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_provenance(
        tmp,
        Provenance(
            stage="toy_teacher",
            model_fingerprint=model_fingerprint(tmp),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            sft_teacher=None,
            config={**asdict(recipe), "train_seconds": round(time.time() - start, 1)},
        ),
    )
    os.replace(tmp, out)  # the cache entry appears whole or not at all
    return out


def write_toy_student_init(out: Path, spec: ToyModelSpec = STUDENT_SPEC, seed: int = 0) -> Path:
    """A randomly initialised toy student (stage zero trains it on the teacher's answers)."""
    tokenizer = build_char_tokenizer()
    build_model(spec, tokenizer, seed=seed).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_toy_prompt_sets(
    out: Path, *, sft: int, opd: int, eval: int, digits=(3,), seed: int = 0, eval_seed: int | None = None
) -> dict[str, Path]:
    """JSONL prompt sets for each stage from disjoint splits (with answers; SFT with gold solutions).
    ``eval_seed`` draws the eval problems with another seed (default ``seed``)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("sft", sft), ("opd", opd), ("eval", eval)):
        s = seed if split != "eval" or eval_seed is None else eval_seed
        records = to_records(sample_problems(split, n, digits=digits, seed=s), with_solution=True)
        paths[split] = write_jsonl(records, out / f"{split}.jsonl")
    return paths
