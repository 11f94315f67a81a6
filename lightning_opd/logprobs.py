"""Memory-bounded token log-probs: never a full ``[batch, seq, vocab]`` tensor in fp32.

At the scale this project targets (an 8B teacher, 150k vocabulary, 16k-token rollouts) a full fp32
log-softmax over one sequence is ~9 GiB, more than the rest of the forward pass. So the kernels here
take the model's *final hidden states* and the LM head's weight, and compute logits for one chunk of
positions at a time in the model's dtype; only that chunk is upcast to fp32 for the logsumexp, and
the entries we keep (the sampled token, a top-k, or a given support) are gathered from it.

Positions are flattened before chunking, so ``chunk_size`` counts token positions over the whole
batch, and a chunk also holds at most ``max_chunk_logits`` logits: at a large vocabulary it has fewer
positions (1024 at 32k, 128 at 262k by default). Peak extra memory is therefore O(max_chunk_logits)
whatever the batch size, the sequence length or the vocabulary.

Whole-sequence scoring on top of these kernels (stage one's teacher, the online baseline's scorer)
is ``lightning_opd.scoring``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from lightning_opd.config import check
from lightning_opd.errors import InputError

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_MAX_TOKENS_PER_BATCH = 16384
# Logits per chunk: 1024 positions at a 32k vocabulary (128 MiB in fp32). Without this cap a fixed
# position count makes each chunk's buffers grow with the vocabulary (8x from 32k to 262k).
DEFAULT_MAX_CHUNK_LOGITS = 1 << 25


def positions_per_chunk(chunk_size: int, vocab: int, max_chunk_logits: int = DEFAULT_MAX_CHUNK_LOGITS) -> int:
    """Positions in one chunk: ``chunk_size``, fewer when ``chunk_size · vocab`` would pass the cap."""
    check(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    check(max_chunk_logits >= 1, f"max_chunk_logits must be >= 1, got {max_chunk_logits}")
    return max(1, min(chunk_size, max_chunk_logits // max(1, vocab)))


# ----------------------------------------------------------------------------------------------
# The model's output head


@dataclass(frozen=True)
class LogitPostprocess:
    """An elementwise map some architectures apply to ``lm_head(h)``: ``softcap(scale · z)``.

    ``scale`` covers Cohere's ``logit_scale``, Granite's ``1 / logits_scaling`` and Falcon-H1's
    ``lm_head_multiplier``; ``softcap`` is Gemma's ``final_logit_softcapping`` (``c · tanh(z / c)``).
    Both maps are monotone, so a top-k of the raw logits is the top-k of the processed ones.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        check(
            self.scale > 0 and math.isfinite(self.scale),
            f"logit scale must be finite and > 0, got {self.scale}",
        )
        check(self.softcap is None or self.softcap > 0, f"softcap must be None or > 0, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


IDENTITY = LogitPostprocess()


def text_config(config):
    """The language model's part of a config (a multimodal config holds it inside)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_postprocess(model) -> LogitPostprocess:
    """The known post-processing of ``model``'s logits, read from its config.

    Anything this does not know about is caught by ``verify_output_head`` (which ``score_sequences``
    runs), so an unknown architecture is refused rather than silently mis-scored.
    """
    config = text_config(model.config)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    if getattr(config, "lm_head_multiplier", None) is not None:  # Falcon-H1: logits * multiplier
        scale *= float(config.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return LogitPostprocess(scale=scale, softcap=float(softcap) if softcap else None)


def output_head(model) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] | None)`` of the model's LM head (tied weights included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise InputError(
            f"{type(model).__name__} has no linear LM head (get_output_embeddings() gave {type(head).__name__}); "
            "load the model with AutoModelForCausalLM"
        )
    return weight, getattr(head, "bias", None)


def final_hidden_states(
    model, input_ids: Tensor, attention_mask: Tensor | dict | None = None, position_ids: Tensor | None = None
) -> Tensor:
    """``[B, S, H]`` hidden states after the decoder's final norm, i.e. the LM head's input.

    Right padding: positions are 0..S-1 unless ``position_ids`` says otherwise (a packed sequence,
    whose ``attention_mask`` is then a 4D block-diagonal mask: ``packing.py``).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if decoder is model:
        raise InputError(
            f"{type(model).__name__} exposes no decoder module; load it with AutoModelForCausalLM"
        )
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def verify_output_head(
    model, input_ids: Tensor, postprocess: LogitPostprocess | None = None, *, max_tokens: int = 16
) -> None:
    """Check that ``postprocess(lm_head(final_hidden_states))`` reproduces ``model(...).logits``.

    One tiny forward on the first ``max_tokens`` tokens of one sequence. It catches architectures
    whose logits are post-processed in a way ``logit_postprocess`` does not know, and decoders whose
    output is not the LM head's input; both would otherwise give plausible but wrong log-probs.
    """
    postprocess = postprocess if postprocess is not None else logit_postprocess(model)
    ids = input_ids[:1, :max_tokens]
    with torch.inference_mode():
        expected = model(input_ids=ids, use_cache=False).logits.float()
        weight, bias = output_head(model)
        ours = postprocess(F.linear(final_hidden_states(model, ids), weight, bias).float())
    # Both paths run the same ops in the same dtype; the tolerance only absorbs kernel differences
    # (a few ulps of the largest logit), far below what a missing scale or softcap changes.
    relative = 1e-3 if weight.dtype == torch.float32 else 2e-2
    tolerance = relative * (1.0 + expected.abs().max().item())
    error = (ours - expected).abs().max().item()
    if not error <= tolerance:
        raise InputError(
            f"{type(model).__name__}: logits from its LM head differ from model(...).logits by {error:.3g} "
            f"(tolerance {tolerance:.3g}); its logits are post-processed in a way lightning-opd does not "
            "replicate, so it cannot be scored here"
        )


# ----------------------------------------------------------------------------------------------
# Chunked kernels on hidden states


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The chunk's logits: in the model's dtype, except under autocast over fp32 weights.

    There, a bf16 head would round the logits before the fp32 log-softmax: up to 0.1-0.19 nats of
    log-prob error at a 152k vocabulary, the size of the trust region. The fp32 master weights are at
    hand, so the chunk's matmul runs in fp32 (a [chunk, V] fp32 buffer, capped by max_chunk_logits).
    """
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(h.device.type):
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), weight, bias)
    return F.linear(h, weight, bias)


def _logprobs_at(logits: Tensor, index: Tensor, postprocess: LogitPostprocess) -> Tensor:
    """fp32 ``log_softmax(postprocess(logits))`` gathered at ``index [c, K]``; ``logits`` is consumed.

    With autograd: the fused ``log_softmax`` (its backward is one fused kernel too). Without: the
    entries are gathered first and the normaliser is computed *in place* on the fp32 chunk, which
    needs no second [c, V] buffer and is ~2x faster on CPU than ``torch.logsumexp``.
    """
    z = postprocess(logits.float())  # the chunk's only fp32 copy (none at all for fp32 models)
    if z.requires_grad:
        return torch.log_softmax(z, dim=-1).gather(-1, index)
    picked = z.gather(-1, index)
    peak = z.amax(dim=-1, keepdim=True)
    log_normaliser = z.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_().add_(peak)
    return picked - log_normaliser


def _token_chunk(h, weight, bias, targets, postprocess: LogitPostprocess) -> Tensor:
    # Negative targets (an ignore index) gather id 0 and are zeroed below, instead of crashing.
    out = _logprobs_at(_logits(h, weight, bias), targets.clamp_min(0).unsqueeze(-1), postprocess).squeeze(-1)
    return torch.where(targets < 0, torch.zeros_like(out), out)


def _ids_chunk(h, weight, bias, ids, postprocess: LogitPostprocess) -> Tensor:
    out = _logprobs_at(_logits(h, weight, bias), ids.clamp_min(0), postprocess)
    return torch.where(ids < 0, torch.zeros_like(out), out)


def _topk_chunk(h, weight, bias, k: int, postprocess: LogitPostprocess) -> tuple[Tensor, Tensor]:
    logits = _logits(h, weight, bias)
    ids = logits.topk(k, dim=-1).indices  # the postprocess is monotone: same top-k
    return ids.to(torch.int32), _logprobs_at(logits, ids, postprocess)


def _run_chunks(fn, hidden: Tensor, per_position: Tensor, chunk_size: int, use_checkpoint: bool) -> Tensor:
    """Apply ``fn(h_chunk, per_position_chunk)`` over flattened positions and concatenate."""
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_x = per_position.reshape(flat_h.shape[0], *per_position.shape[len(lead) :])
    outs = []
    for start in range(0, flat_h.shape[0], chunk_size):
        h, x = flat_h[start : start + chunk_size], flat_x[start : start + chunk_size]
        if use_checkpoint:
            # Keep only the chunk's inputs for backward; its [chunk, V] logits are recomputed there.
            outs.append(torch_checkpoint(fn, h, x, use_reentrant=False))
        else:
            outs.append(fn(h, x))
    if not outs:
        return flat_h.new_zeros((0, *flat_x.shape[1:]), dtype=torch.float32).reshape(*lead, *flat_x.shape[1:])
    return torch.cat(outs).reshape(*lead, *flat_x.shape[1:])


def _wants_checkpoint(checkpoint: bool, *tensors: Tensor | None) -> bool:
    return checkpoint and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def token_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = False,
    postprocess: LogitPostprocess = IDENTITY,
    max_chunk_logits: int = DEFAULT_MAX_CHUNK_LOGITS,
) -> Tensor:
    """fp32 ``log softmax(postprocess(hidden @ weight.T + bias))[..., targets]``, shape ``hidden.shape[:-1]``.

    ``hidden[..., i, :]`` must already be the state that predicts ``targets[..., i]`` (shift outside).
    A negative target (e.g. -100 at padding) yields 0.0 there. ``checkpoint=True`` (training)
    recomputes each chunk's logits in backward, so autograd holds O(chunk·V), never O(B·S·V);
    without it, backward keeps every chunk's fp32 logits.
    """
    check(
        targets.shape == hidden.shape[:-1],
        f"targets shape {tuple(targets.shape)} != {tuple(hidden.shape[:-1])}",
    )

    def fn(h, t):
        return _token_chunk(h, weight, bias, t, postprocess)

    rows = positions_per_chunk(chunk_size, weight.shape[0], max_chunk_logits)
    return _run_chunks(fn, hidden, targets, rows, _wants_checkpoint(checkpoint, hidden, weight, bias))


def logprobs_at_ids_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checkpoint: bool = False,
    postprocess: LogitPostprocess = IDENTITY,
    max_chunk_logits: int = DEFAULT_MAX_CHUNK_LOGITS,
) -> Tensor:
    """fp32 full-vocabulary log-probs at ``ids [..., K]`` (e.g. the student on the teacher's top-k).

    Negative ids yield 0.0. Same memory contract as ``token_logprobs_from_hidden``.
    """
    check(
        ids.shape[:-1] == hidden.shape[:-1],
        f"ids shape {tuple(ids.shape)} does not match hidden {tuple(hidden.shape)}",
    )

    def fn(h, x):
        return _ids_chunk(h, weight, bias, x, postprocess)

    rows = positions_per_chunk(chunk_size, weight.shape[0], max_chunk_logits)
    return _run_chunks(fn, hidden, ids, rows, _wants_checkpoint(checkpoint, hidden, weight, bias))


def topk_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    postprocess: LogitPostprocess = IDENTITY,
    max_chunk_logits: int = DEFAULT_MAX_CHUNK_LOGITS,
) -> tuple[Tensor, Tensor]:
    """``(ids int32 [..., k], log-probs fp32 [..., k])``: the k most likely tokens, most likely first.

    No gradient path (the top-k is a teacher-side quantity); call under ``torch.no_grad`` or
    ``inference_mode`` when ``hidden`` requires grad.
    """
    check(1 <= k <= weight.shape[0], f"k must be in [1, vocab={weight.shape[0]}], got {k}")
    rows = positions_per_chunk(chunk_size, weight.shape[0], max_chunk_logits)
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids_out, lp_out = [], []
    for start in range(0, flat.shape[0], rows):
        ids, lps = _topk_chunk(flat[start : start + rows], weight, bias, k, postprocess)
        ids_out.append(ids)
        lp_out.append(lps)
    if not ids_out:
        return (
            torch.zeros((*lead, k), dtype=torch.int32, device=hidden.device),
            torch.zeros((*lead, k), dtype=torch.float32, device=hidden.device),
        )
    return torch.cat(ids_out).reshape(*lead, k), torch.cat(lp_out).reshape(*lead, k)
