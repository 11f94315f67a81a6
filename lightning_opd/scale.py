"""What makes a student trainable at scale, shared by stage zero, stage two and the online baseline.

The flags (``ScaleFlags``) and the three places they act:

- ``prepare_student``: gradient checkpointing on the decoder layers (transformers' own, non-reentrant,
  so it also holds when the chunked head calls the decoder directly, past the model's ``forward``),
  then LoRA adapters through peft. Both come before ``accelerator.prepare``.
- ``make_adamw``: AdamW over the *trainable* parameters only (LoRA: the adapters), fused where the
  device has a fused kernel, or bitsandbytes' 8-bit AdamW on request.
- ``save_student``: the final model, LoRA adapters merged into the base
  weights (``W + (alpha / r) B A``, computed from the gathered state dict, so it holds under any
  wrapping), cast to the dtype asked for.

Precision (METHODS: the paper's lr is 2e-6): weights stay fp32 (master weights) and
``--mixed-precision bf16`` runs the compute in bf16 under autocast. Pure-bf16 weights are not offered:
a 2e-6 update is below bf16's resolution for most weights (one step changes ~4% of them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_opd.config import check
from lightning_opd.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw-8bit")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(kw_only=True)
class ScaleFlags:
    """Memory flags of every trainer (``lopd sft``, ``lopd train``, ``lopd train-online``)."""

    gradient_checkpointing: bool = _help(
        "recompute each decoder layer's activations in backward (saved: one layer input per token "
        "per layer); identical gradients, ~30% more compute",
        False,
    )
    lora_rank: int = _help(
        "train LoRA adapters of this rank through peft instead of all weights (0 = off)", 0
    )
    lora_alpha: float = _help("LoRA scale numerator (scale = alpha / rank; 0 = 2 x rank)", 0.0)
    lora_dropout: float = _help("dropout on the LoRA path (0 keeps stage two deterministic)", 0.0)
    lora_target_modules: str = _help(
        "modules that get adapters: all-linear (every linear layer but the LM head) or a comma list of "
        "names, e.g. q_proj,k_proj,v_proj,o_proj",
        "all-linear",
    )
    optim: str = _help("adamw (fused on CUDA) | adamw-8bit (bitsandbytes, CUDA)", "adamw")
    save_dtype: str = _help(
        "dtype of the saved final model: auto (the student checkpoint's own dtype) | float32 | "
        "bfloat16 | float16",
        "auto",
    )

    def check_scale_flags(self) -> None:
        check(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        check(self.lora_alpha >= 0, f"lora_alpha must be >= 0 (0 = 2 x rank), got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(
            bool(self.lora_target_modules.strip(", ")),
            "lora_target_modules is empty; pass all-linear or names such as q_proj,v_proj",
        )
        check(self.optim in OPTIMIZERS, f"optim must be one of {' | '.join(OPTIMIZERS)}, got {self.optim!r}")
        check(
            self.save_dtype in SAVE_DTYPES,
            f"save_dtype must be one of {' | '.join(SAVE_DTYPES)}, got {self.save_dtype!r}",
        )

    @property
    def lora_scaling(self) -> float:
        return (self.lora_alpha or 2.0 * self.lora_rank) / self.lora_rank


def prepare_student(model, flags: ScaleFlags):
    """``model`` with gradient checkpointing and/or LoRA adapters as ``flags`` ask (before prepare)."""
    if flags.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"{type(model).__name__} does not support gradient checkpointing in transformers; drop "
                "--gradient-checkpointing"
            )
        # Non-reentrant: correct when the checkpointed layers' inputs need no grad (LoRA, frozen
        # embeddings) and when the decoder is called directly rather than through model.forward.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if flags.lora_rank:
        model = _with_lora(model, flags)
    return model


def _with_lora(model, flags: ScaleFlags):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(
            "--lora-rank needs peft, a dependency of lightning-opd: `pip install peft`"
        ) from None
    targets = flags.lora_target_modules.strip()
    names = targets if targets == "all-linear" else [t for t in targets.split(",") if t]
    config = LoraConfig(
        r=flags.lora_rank,
        lora_alpha=flags.lora_scaling * flags.lora_rank,
        lora_dropout=flags.lora_dropout,
        target_modules=names,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"--lora-target-modules {targets}: {str(e).splitlines()[0]}") from None


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; check --lora-target-modules")
    return params


def make_adamw(params, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, optim: str = "adamw"):
    """AdamW over ``params``: torch's fused kernel on CUDA (one launch for all tensors), else the default
    implementation; ``adamw-8bit`` is bitsandbytes' 8-bit AdamW (CUDA only)."""
    params = list(params)
    if optim == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optim adamw-8bit needs bitsandbytes: `pip install bitsandbytes`") from None
        if params[0].device.type != "cuda":
            raise ConfigError("--optim adamw-8bit runs on CUDA only; use --optim adamw on this device")
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    fused = all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


# ----------------------------------------------------------------------------------------------
# The final model

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.[^.]+\.weight$")


def merged_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft LoRA model's state dict as the base model's: ``W + scaling · B @ A`` per adapted linear,
    peft's ``base_model.model.`` prefix and ``.base_layer`` dropped. Merged in fp32."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["which"]] = value
        else:
            out[key] = value
    for module, ab in pairs.items():
        base = f"{module}.base_layer.weight"
        weight = out[base].float() + scaling * (ab["B"].float() @ ab["A"].float())
        out[base] = weight.to(out[base].dtype)
    renamed = {}
    for key, value in out.items():
        key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        renamed[key] = value
    return renamed


def lora_adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if _LORA_KEY.match(k)}


def resolve_save_dtype(save_dtype: str, student_dir: str | Path) -> torch.dtype:
    """``--save-dtype``; ``auto`` is the dtype the student checkpoint was saved in (fp32 if unstated)."""
    from lightning_opd.models.loading import DTYPES

    if save_dtype != "auto":
        return DTYPES[save_dtype]
    try:
        saved = json.loads((Path(student_dir) / "config.json").read_text())
    except (OSError, ValueError):
        saved = {}
    name = saved.get("dtype") or saved.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def save_student(student, state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """Write ``student`` (``state``: its full state dict, gathered) as a Hugging Face directory in
    ``dtype``. A LoRA student is saved merged, a plain checkpoint for the next precompute or vLLM,
    with its adapter beside it in ``path/adapter`` (what ``PeftModel.from_pretrained`` loads)."""
    path = Path(path)
    state = _without_tied_copies(student, state)
    if is_lora(student):
        config = student.peft_config["default"]
        student.save_pretrained(path / "adapter", state_dict=cast_state(lora_adapter_state(state), dtype))
        state = merged_lora_state(state, config.lora_alpha / config.r)
        student = student.get_base_model()
    student.save_pretrained(path, state_dict=cast_state(state, dtype))
    # save_pretrained records the in-memory (fp32 master) dtype; config.json must say what the saved
    # weights are, since from_pretrained(dtype="auto") and vLLM load in that dtype.
    student.config.dtype = dtype
    student.config.save_pretrained(path)


def _without_tied_copies(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with one key per shared parameter. A gathered state dict (FSDP2) holds a tied LM head
    as its own tensor, which save_pretrained would write twice (a second vocab x hidden matrix)."""
    first: dict[int, str] = {}
    drop = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            drop.add(name)
    return {k: v for k, v in state.items() if k not in drop}
