"""Loading models and tokenizers with the checks that catch wrong inputs before any GPU work."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lightning_opd.errors import InputError, TokenizerMismatchError
from lightning_opd.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from lightning_opd.models.provenance import ModelIdentity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; pass --device auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: CUDA is not available on this machine; pass --device cpu or auto"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); pick one of them"
        )
    return dev


def check_device_and_dtype(device: str, dtype: str) -> None:
    """For configs: refuse an unknown/unavailable ``--device`` or an unknown ``--dtype`` before any work."""
    resolve_dtype(dtype, resolve_device(device))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 where the hardware has it; fp32 on CPU, where bf16 matmuls are slow and imprecise.
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def check_model_dir(path: str | Path) -> Path:
    """Fail early, in one line, unless ``path`` is a saved causal-LM directory."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist; pass a directory made by save_pretrained")
    if not (path / "config.json").exists():
        raise InputError(f"{path} has no config.json; it is not a Hugging Face model directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path}/config.json is unreadable or not JSON ({e}); re-save the model with save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise InputError(
            f"{path}/config.json holds a JSON {type(config).__name__}, not a model config object"
        )
    model_type = config.get("model_type")
    # The saved architecture decides (a BERT checkpoint's type has a causal-LM class, its weights do not).
    architectures = config.get("architectures") or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    is_causal = (
        any(a in causal_classes for a in architectures)
        if architectures
        else (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    )
    if not is_causal:
        raise InputError(
            f"{path} holds a {model_type!r} model ({', '.join(architectures) or 'no architecture'}), which is not "
            "a causal language model; pass a decoder-only LM (e.g. Qwen2, Llama)"
        )
    return path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "no message"


def load_config(path: str | Path):
    """The model's ``AutoConfig``; a config.json that transformers cannot parse is an InputError."""
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError, OSError... here
        raise InputError(
            f"could not read the model config in {path} ({type(e).__name__}: {_first_line(e)}); "
            "re-save the model with save_pretrained"
        ) from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types here; the message is what matters
        raise InputError(f"could not load a tokenizer from {path}: {e}") from e
    if tokenizer.pad_token_id is None:
        # Batched generation and scoring need a pad id; EOS is the usual stand-in and is never trained on.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_fits_model(tokenizer: PreTrainedTokenizerBase, config, where: str) -> None:
    """A tokenizer whose ids exceed the model's embedding table does not belong to that model."""
    if len(tokenizer) > config.vocab_size:
        raise TokenizerMismatchError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{config.vocab_size}; this tokenizer does not belong to the model — use the tokenizer saved "
            "with the model"
        )
    eos = getattr(config, "eos_token_id", None)
    eos_ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and tokenizer.eos_token_id not in eos_ids:
        raise TokenizerMismatchError(
            f"{where}: the tokenizer's EOS id {tokenizer.eos_token_id} differs from the model's {eos}; "
            "use the tokenizer saved with the model"
        )


def load_causal_lm(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer_path=None,
    attn_implementation=None,
):
    """Load (model, tokenizer) from a saved directory, with the input checks above. Eval mode.
    ``attn_implementation``: transformers' name (sdpa, eager, flash_attention_2); None = its default."""
    path = check_model_dir(path)
    dev = resolve_device(device)
    config = load_config(path)
    tokenizer = load_tokenizer(tokenizer_path or path)
    check_tokenizer_fits_model(tokenizer, config, str(path))
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, dev), **extra)
    except Exception as e:  # missing, truncated or garbage weight files: many exception types, one message
        raise InputError(
            f"could not load model weights from {path} ({type(e).__name__}: {_first_line(e)}); "
            "re-save the model with save_pretrained"
        ) from None
    model.to(dev).eval()
    return model, tokenizer


def model_identity(
    path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, dtype=None
) -> ModelIdentity:
    path = check_model_dir(path)
    tokenizer = tokenizer or load_tokenizer(path)
    return ModelIdentity(
        path=str(Path(path).resolve()),
        fingerprint=model_fingerprint(path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        dtype=None if dtype is None else str(dtype).replace("torch.", ""),
    )


def check_same_tokenizer(a: ModelIdentity, b: ModelIdentity, what: str) -> None:
    """Student and teacher must share one vocabulary: a token id must mean the same string to both."""
    if a.tokenizer_fingerprint != b.tokenizer_fingerprint:
        raise TokenizerMismatchError(
            f"{what}: {a.path} and {b.path} use different tokenizers ({a.tokenizer_fingerprint} vs "
            f"{b.tokenizer_fingerprint}); on-policy distillation scores the student's token ids with the "
            "teacher, so both must share one tokenizer"
        )
