"""The memory plan of stage two: the estimated peak per GPU of each way to train a student.

    lopd plan --model runs/sft --sequence-length 16384 --gpus 8 --gpu-memory-gib 80

Everything but the activations is arithmetic on the parameter counts of the architecture, built on
the meta device from ``config.json`` (no weights read):

- weights are fp32 master weights (4 B/param), gradients fp32 (4 B), AdamW's two moments fp32 (8 B;
  2 B with ``--optim adamw-8bit``); DDP keeps a second fp32 copy of the gradients in its buckets;
- LoRA: the frozen base weights, and weights, gradients and moments of the adapters only;
- FSDP2 divides weights, gradients and moments by the GPU count, and adds what is gathered whole at a
  time: the root unit (embedding, final norm, LM head) and two decoder layers (one prefetched), with
  one layer's unsharded gradients.

The activations are *measured*, not modelled: one decoder layer of the very architecture, at its real
width, runs forward on the CPU under the training precision at two sequence lengths, and autograd's
saved tensors are counted: a per-token slope, and a fixed part (under bf16 autocast, the bf16 copies
of the layer's fp32 weights, kept for backward: 2 B/param over the whole model without checkpointing,
also under FSDP2, whose all-gathers stay fp32). Times tokens and layers, that is the estimate. With
gradient checkpointing a layer keeps only its input; the layer being recomputed in backward holds
its full activations again. The backward pass also holds the gradients in flight through one layer,
the chunked LM head a few ``[chunk, vocab]`` fp32 buffers and its weight gradient as a fresh tensor
(two with a tied head) before it is added to the accumulated one. ``OVERHEAD_GIB`` covers the CUDA context,
cuBLAS workspaces and the allocator's slack.

A test pins this estimate against what a whole multi-layer student saves at other lengths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_opd.errors import InputError
from lightning_opd.logprobs import DEFAULT_MAX_CHUNK_LOGITS, positions_per_chunk, text_config

GIB = 1024**3
OVERHEAD_GIB = 2.0
HEAD_BUFFERS = 4  # logits, log-softmax, their gradient, the recomputed logits: [chunk, vocab] fp32 each


# ----------------------------------------------------------------------------------------------
# The architecture


@dataclass(frozen=True)
class Shapes:
    """Parameter counts and activation bytes of one architecture (what the plan needs)."""

    name: str
    layers: int
    hidden: int
    vocab: int
    params: int  # unique parameters (a tied head counted once)
    layer_params: int  # one decoder layer
    root_params: int  # everything outside the decoder layers: embedding, final norm, untied head
    lora_params_per_rank: int  # all-linear adapters of all layers, per unit of rank
    tied: bool  # the LM head is the input embedding
    act_bytes_per_token: float  # saved by one layer for backward, checkpointing off
    act_bytes_per_layer: float  # ... and independent of tokens: autocast's bf16 copies of its weights
    ckpt_bytes_per_token: float  # saved by one layer with checkpointing (its input)
    ckpt_bytes_per_layer: float
    precision: str


def load_model_config(path: str | Path):
    """A transformers config from a model directory or a bare ``config.json`` (no weights needed)."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a model directory or its config.json")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a transformers model config ({str(e).splitlines()[0]})") from None


def _decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise InputError(f"{type(model).__name__}: no model.layers; lopd plan knows decoder-only causal LMs")
    return layers


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied head once


def _build(config, device: str):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _lora_params_per_rank(layers) -> int:
    """``r * (in + out)`` summed over every linear layer of the decoder (all-linear), divided by r."""
    return sum(m.in_features + m.out_features for m in layers.modules() if isinstance(m, torch.nn.Linear))


def architecture_shapes(
    config, precision: str = "bf16", measure_tokens: tuple[int, int] = (32, 64)
) -> Shapes:
    """``Shapes`` of ``config``: counts on the meta device, activations measured on one CPU layer."""
    text = text_config(config)
    meta = _build(copy.deepcopy(config), "meta")  # from_config rewrites the config's dtype
    layers = _decoder_layers(meta)
    params = _num_params(meta)
    layer_params = sum(p.numel() for p in layers[0].parameters())
    lora = _lora_params_per_rank(layers)
    (act, act_fixed), (ckpt, ckpt_fixed) = _measure_layer(config, precision, measure_tokens)
    return Shapes(
        name=getattr(text, "model_type", type(meta).__name__),
        layers=len(layers),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
        params=params,
        layer_params=layer_params,
        root_params=params - len(layers) * layer_params,
        lora_params_per_rank=lora,
        tied=meta.get_output_embeddings().weight is meta.get_input_embeddings().weight,
        act_bytes_per_token=act,
        act_bytes_per_layer=act_fixed,
        ckpt_bytes_per_token=ckpt,
        ckpt_bytes_per_layer=ckpt_fixed,
        precision=precision,
    )


def _one_layer_config(config):
    small = copy.deepcopy(config)
    text = text_config(small)
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        # the global-attention layer type when there is one: its saved tensors are the larger
        types = list(text.layer_types)
        text.layer_types = ["full_attention" if "full_attention" in types else types[0]]
    text.vocab_size = 256  # the head and embedding are planned apart; a small table keeps this cheap
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(text, key, None) is not None and getattr(text, key) >= 256:
            setattr(text, key, 0)
    return small


class _SavedBytes:
    """Counts the bytes autograd saves for backward while active (each storage once), the parameters
    themselves excluded: saving a parameter costs nothing, it is held anyway."""

    def __init__(self, model):
        self.storages: dict[tuple, int] = {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            key = (ptr, str(t.device))
            self.storages[key] = max(self.storages.get(key, 0), t.untyped_storage().nbytes())
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def layer_saved_bytes(model, input_ids: torch.Tensor, precision: str) -> int:
    """Bytes saved inside the decoder layers during one training forward of ``model`` (embedding,
    final norm and head excluded): what the plan's per-layer slope describes."""
    from lightning_opd.logprobs import final_hidden_states

    counter, active = _SavedBytes(model), []

    def enter(*_):  # count only between a layer's start and end
        active.append(counter.hooks())
        active[-1].__enter__()

    def leave(*_):
        active.pop().__exit__(None, None, None)

    layers = _decoder_layers(model)
    handles = [layer.register_forward_pre_hook(enter) for layer in layers]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    try:
        with _autocast(precision):
            final_hidden_states(model, input_ids, torch.ones_like(input_ids))
    finally:
        for h in handles:
            h.remove()
    return counter.total


def _autocast(precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def _measure_layer(config, precision: str, tokens: tuple[int, int]):
    """What one layer saves, checkpointing off and on: ``((per token, fixed), (per token, fixed))``,
    the line through two lengths (linear: attention keeps no [seq, seq] tensor for backward)."""
    from lightning_opd.scale import ScaleFlags, prepare_student

    torch.manual_seed(0)
    model = _build(_one_layer_config(config), "cpu").train()
    out = []
    for checkpointing in (False, True):
        if checkpointing:
            model = prepare_student(model, ScaleFlags(gradient_checkpointing=True)).train()
        a, b = (layer_saved_bytes(model, torch.randint(3, 250, (1, n)), precision) for n in tokens)
        slope = (b - a) / (tokens[1] - tokens[0])
        out.append((slope, max(0.0, a - slope * tokens[0])))
    return out


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Choice:
    lora_rank: int  # 0 = full fine-tuning
    fsdp2: bool
    checkpointing: bool
    tokens: int  # per micro-batch, per GPU
    optim: str = "adamw"

    def flags(self, gpus: int, micro_batch_size: int, command: str = "train") -> str:
        parts = [f"--micro-batch-size {micro_batch_size}", "--mixed-precision bf16"]
        if self.checkpointing:
            parts.append("--gradient-checkpointing")
        if self.lora_rank:
            parts.append(f"--lora-rank {self.lora_rank}")
        if self.optim != "adamw":
            parts.append(f"--optim {self.optim}")
        if gpus == 1:
            launch = f"lopd {command}"
        elif self.fsdp2:
            launch = (
                f"accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes {gpus} "
                "-m lightning_opd.cli train"
            )
        else:
            launch = f"accelerate launch --multi_gpu --num_processes {gpus} -m lightning_opd.cli train"
        return f"{launch} ... {' '.join(parts)}"


def estimate(shapes: Shapes, choice: Choice, gpus: int) -> dict[str, float]:
    """Bytes per GPU by component, and their sum ``total`` (see the module docstring)."""
    p, n = shapes.params, max(1, gpus)
    moments = 2 if choice.optim == "adamw-8bit" else 8
    fsdp = choice.fsdp2 and n > 1
    shard = n if fsdp else 1
    trainable = shapes.lora_params_per_rank * choice.lora_rank if choice.lora_rank else p
    out = {
        "weights": 4 * p / shard + (4 * trainable / shard if choice.lora_rank else 0),
        "gradients": 4 * trainable / shard,
        "optimizer": moments * trainable / shard,
        "ddp_buckets": 4 * trainable if n > 1 and not fsdp else 0,
    }
    if fsdp:  # gathered whole at a time: the root, two layers, one layer's gradients
        out["fsdp_gathered"] = 4 * (2 * shapes.root_params + 3 * shapes.layer_params)
    t = choice.tokens
    if choice.checkpointing:
        kept = shapes.ckpt_bytes_per_token * t + shapes.ckpt_bytes_per_layer
    else:
        kept = shapes.act_bytes_per_token * t + shapes.act_bytes_per_layer
    out["activations"] = shapes.layers * kept
    # backward: the gradients in flight through one layer (about half its saved activations, measured:
    # BENCHMARKS.md), and with checkpointing the layer's recomputed activations on top
    one_layer = shapes.act_bytes_per_token * t + shapes.act_bytes_per_layer
    out["backward"] = one_layer * (1.5 if choice.checkpointing else 0.5)
    chunk = positions_per_chunk(1024, shapes.vocab, DEFAULT_MAX_CHUNK_LOGITS)
    head = shapes.vocab * shapes.hidden
    # The head's weight gradient arrives as a fresh [vocab, hidden] fp32 tensor before it is added to the
    # accumulated one; a tied head also holds it until the embedding's gradient joins it (two at once).
    weight_grads = 4 * head * (2 if shapes.tied else 1) if not choice.lora_rank else 0
    out["lm_head"] = HEAD_BUFFERS * 4 * chunk * shapes.vocab + 4 * shapes.hidden * t + weight_grads
    out["overhead"] = OVERHEAD_GIB * GIB
    out["total"] = sum(out.values())
    return out


def resident_model_bytes(config) -> int:
    """A frozen model kept on the GPU beside the student (the online baseline's teacher): its unique
    parameters in the dtype its config names (bf16 unless it says fp32)."""
    dtype = str(getattr(text_config(config), "dtype", None) or "bfloat16")
    return _num_params(_build(copy.deepcopy(config), "meta")) * (4 if "float32" in dtype else 2)


def plan_table(
    shapes: Shapes,
    *,
    gpus: int,
    gpu_memory_gib: float,
    tokens: list[int],
    lora_rank: int = 16,
    resident: dict[str, float] | None = None,
) -> list[dict]:
    """Every choice, with its estimate and whether it fits, cheapest first among those that fit.

    "Cheapest" is the least extra compute for the same update: full fine-tuning before LoRA (LoRA is
    another update), then no checkpointing (it costs one more forward, ~1.3x), then DDP before FSDP2
    (less communication), then the most tokens per micro-batch (fewer, fuller steps). ``resident``:
    bytes per GPU of frozen models that share it (the online baseline's teacher and reference copy).
    """
    rows = []
    for rank in (0, lora_rank):
        for fsdp2 in (False, True) if gpus > 1 else (False,):
            for ckpt in (False, True):
                for t in tokens:
                    choice = Choice(lora_rank=rank, fsdp2=fsdp2, checkpointing=ckpt, tokens=t)
                    est = estimate(shapes, choice, gpus)
                    for name, size in (resident or {}).items():  # frozen models beside the student
                        est[name] = size
                        est["total"] += size
                    rows.append(
                        {
                            "choice": choice,
                            "peak_gib": est["total"] / GIB,
                            "fits": est["total"] <= gpu_memory_gib * GIB,
                            "parts": est,
                        }
                    )
    rows.sort(
        key=lambda r: (
            not r["fits"],
            r["choice"].lora_rank > 0,
            r["choice"].checkpointing,
            r["choice"].fsdp2,
            -r["choice"].tokens,
        )
    )
    return rows


def fit_warning(config, *, tokens: int, gpus: int, device) -> str | None:
    """``lopd train``'s check before loading data: a warning when the plan says the chosen settings will
    not fit ``device`` (CUDA only: the one device whose memory is known), else None."""
    if torch.device(device).type != "cuda":
        return None
    from lightning_opd.stage2.sharding import fsdp_requested

    precision = "bf16" if config.mixed_precision == "bf16" else "no"
    shapes = architecture_shapes(load_model_config(config.student), precision)
    choice = Choice(
        lora_rank=config.lora_rank,
        fsdp2=gpus > 1 and fsdp_requested(),
        checkpointing=config.gradient_checkpointing,
        tokens=tokens,
        optim=config.optim,
    )
    need = estimate(shapes, choice, gpus)["total"]
    have = torch.cuda.get_device_properties(torch.device(device)).total_memory
    if need <= have:
        return None
    return (
        f"warning: the memory plan puts this run at ~{need / GIB:.0f} GiB per GPU, more than this "
        f"GPU's {have / GIB:.0f} GiB (at least {tokens} tokens per micro-batch); see `lopd plan --model "
        f"{config.student} --gpus {gpus}` for settings that fit"
    )
