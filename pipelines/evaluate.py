"""Evaluate any model directory on a prompt set: greedy accuracy and sampled pass@k.

lopd eval --model runs/sft --prompts prompts/eval.jsonl --samples 4 --out runs/sft/eval.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning_opd.config import check, check_writable_file, parse_number_list, write_json_atomic
from lightning_opd.errors import ConfigError
from lightning_opd.evaluation.accuracy import EvalResult, evaluate_model, format_table
from lightning_opd.evaluation.verifiers import check_verifier
from lightning_opd.models.loading import (
    check_device_and_dtype,
    check_model_dir,
    load_causal_lm,
    load_tokenizer,
)
from lightning_opd.prompts import check_chat_template_mode, load_prompts
from lightning_opd.stage1.samplers import resolve_backend


@dataclass
class EvalJobConfig:
    model: str = field(metadata={"help": "model directory"})
    prompts: str = field(metadata={"help": "prompt set with reference answers"})
    out: str = field(default="", metadata={"help": "JSON file for the results (default: none)"})
    name: str = field(default="", metadata={"help": "row label (default: the model path)"})
    prompt_field: str = "prompt"
    verifier: str = field(
        default="auto",
        metadata={
            "help": "auto (addition for the toy's a+b= prompts, else math) | math | last_number | addition"
        },
    )
    limit: int = 0
    max_new_tokens: int = 64
    greedy: bool = True
    samples: int = field(default=0, metadata={"help": "sampled responses per prompt for pass@k (0 = none)"})
    ks: str = field(default="1,4", metadata={"help": "comma-separated k values for pass@k"})
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 256
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    chat_template: str = "auto"

    def __post_init__(self):
        check_verifier(self.verifier)
        check(self.greedy or self.samples > 0, "nothing to evaluate: pass --greedy or --samples N")
        check(self.samples >= 0, f"samples must be >= 0, got {self.samples}")
        check_chat_template_mode(self.chat_template)
        check_device_and_dtype(self.device, self.dtype)
        ks = self.k_values()
        if self.samples:
            check(bool(ks), f"--ks must name at least one k for pass@k, got {self.ks!r}")
            check(
                max(ks) <= self.samples,
                f"pass@{max(ks)} needs at least {max(ks)} samples per prompt, got --samples {self.samples}; "
                f"raise --samples or drop k > {self.samples} from --ks",
            )
        if self.out:
            check_writable_file(self.out, "--out")

    def k_values(self) -> tuple[int, ...]:
        return tuple(parse_number_list(self.ks, int, "--ks", minimum=1))


def run(config: EvalJobConfig, log=print) -> EvalResult:
    # The backend is chosen before anything is loaded: vLLM loads the model itself, from the directory.
    backend = resolve_backend(config.backend, model_is_directory=True)
    if backend == "vllm":
        model, tokenizer = str(check_model_dir(config.model)), load_tokenizer(config.model)
    else:
        model, tokenizer = load_causal_lm(config.model, dtype=config.dtype, device=config.device)
    records = load_prompts(config.prompts, prompt_field=config.prompt_field, limit=config.limit or None)
    result = evaluate_model(
        model,
        tokenizer,
        records,
        model_name=config.name or config.model,
        verifier=config.verifier,
        max_new_tokens=config.max_new_tokens,
        greedy=config.greedy,
        samples=config.samples,
        ks=config.k_values(),
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.batch_size,
        seed=config.seed,
        backend=backend,
        chat_template=config.chat_template,
    )
    log(format_table([result]))
    if config.out:
        try:
            write_json_atomic(Path(config.out), {"config": config.__dict__, "result": result.as_dict()})
        except OSError as e:
            raise ConfigError(
                f"could not write --out {config.out} ({e.strerror}); choose a writable path"
            ) from None
    return result


def load_result(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())["result"]
