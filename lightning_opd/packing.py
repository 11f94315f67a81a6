"""Micro-batches by token budget, and padding-free packing of a micro-batch into one sequence.

Reasoning rollouts range from a few hundred to 16k tokens. Rows taken in stream order and padded to
the longest compute up to ~2x the useful tokens at 4 rows per micro-batch. Two remedies, both inside
the step's rows, so the optimizer step and the loss normalisation do not change:

- ``micro_batches``: ``--max-tokens-per-micro-batch N`` groups the step's rows by length, longest
  first, into micro-batches of at most N computed tokens (padded: rows x longest; packed: the sum). A
  row longer than N gets a micro-batch of its own (with a one-time warning).
- ``pack``: ``--pack`` concatenates a micro-batch's rows into one ``[1, total]`` sequence,
  ``position_ids`` restarting at 0 for each row. ``position_ids`` alone do not keep rows apart under
  sdpa or eager attention in transformers 5.x (measured: 0.2 off in logits), so an explicit
  block-diagonal causal mask goes with them: boolean for sdpa (total^2 bytes: 256 MiB at 16k tokens),
  additive fp32 for eager (4 x that). With flash-attention-2 (``--attn-implementation
  flash_attention_2``, CUDA, when installed) no mask is built: it reads the row boundaries from
  ``position_ids`` (varlen). Sliding-window layers (Gemma 3) get their own mask with the window.

The objective still sees the padded ``[B, S-1]`` layout: only the model's forward is packed. The
chunked head reads the packed response positions in row order, which is the row-major order of the
padded layout, so the log-probs scatter back unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attn_implementation(name: str, device) -> str:
    """``auto``: flash-attention-2 on CUDA when the package is installed, else sdpa."""
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def row_length(row: dict, horizon: int) -> int:
    """Tokens a row costs in the forward: prompt + response cut at the horizon."""
    return len(row["prompt_ids"]) + min(len(row["response_ids"]), horizon)


_warned_long_rows = False


def micro_batches(
    rows: list[dict], *, horizon: int, micro_batch_size: int, max_tokens: int = 0, packed: bool = False
) -> list[list[dict]]:
    """The step's rows as micro-batches: fixed ``micro_batch_size`` rows in order, or, with
    ``max_tokens``, grouped by length within the budget (see the module docstring)."""
    if not max_tokens:
        return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    global _warned_long_rows
    lengths = [row_length(r, horizon) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])  # longest first, stable
    out: list[list[dict]] = []
    current: list[int] = []
    for i in order:
        if lengths[i] > max_tokens and not _warned_long_rows:
            _warned_long_rows = True
            warnings.warn(
                f"a row of {lengths[i]} tokens is longer than --max-tokens-per-micro-batch {max_tokens}: it "
                "gets a micro-batch of its own (raise the budget if that runs out of memory less often)",
                stacklevel=2,
            )
        if current:
            if packed:
                cost = sum(lengths[j] for j in current) + lengths[i]
            else:  # padded to the first (longest) row of the micro-batch
                cost = (len(current) + 1) * lengths[current[0]]
            if cost > max_tokens:
                out.append([rows[j] for j in current])
                current = []
        current.append(i)
    if current:
        out.append([rows[j] for j in current])
    return out


@dataclass
class PackedInputs:
    """One micro-batch as one sequence. Position p of the ``[1, N-1]`` tensors predicts token p+1."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N], 0.. per row
    attention_mask: torch.Tensor | dict | None  # 4D block-diagonal (or per layer type); None for FA2
    where: torch.Tensor  # [1, N-1] bool: trained response positions, in the padded layout's order
    targets: torch.Tensor  # [1, N-1]
    topk_ids: torch.Tensor | None  # [1, N-1, K]


def pack(batch, config, *, needs_topk: bool) -> PackedInputs:
    """The padded ``batch`` (right-padded, as ``collate`` makes it) as one packed sequence for a model
    with ``config`` (its attention implementation and sliding windows decide the mask)."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    device = batch.input_ids.device
    ids, positions, segments, where, targets, topk = [], [], [], [], [], []
    for b, n in enumerate(int(x) for x in lengths):
        ids.append(batch.input_ids[b, :n])
        positions.append(torch.arange(n, device=device))
        segments.append(torch.full((n,), b, device=device))
        # Positions 0..n-2 predict the row's own next token; position n-1 would predict the next row.
        where.append(torch.cat([batch.mask[b, : n - 1] > 0, torch.zeros(1, dtype=torch.bool, device=device)]))
        targets.append(torch.cat([batch.targets[b, : n - 1], batch.targets.new_zeros(1)]))
        if needs_topk:
            k = batch.teacher_topk_ids.shape[-1]
            topk.append(
                torch.cat([batch.teacher_topk_ids[b, : n - 1], batch.teacher_topk_ids.new_zeros(1, k)])
            )
    position = torch.cat(positions)
    return PackedInputs(
        input_ids=torch.cat(ids)[None],
        position_ids=position[None],
        attention_mask=block_diagonal_mask(torch.cat(segments), position, config),
        where=torch.cat(where)[:-1][None],
        targets=torch.cat(targets)[:-1][None],
        topk_ids=torch.cat(topk)[:-1][None] if needs_topk else None,
    )


def block_diagonal_mask(segment: torch.Tensor, position: torch.Tensor, config):
    """The mask of a packed sequence whose token i belongs to row ``segment[i]`` at ``position[i]``:
    causal within each row, nothing across rows; per layer type where the model has sliding layers."""
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation == "flash_attention_2":
        return None  # varlen from position_ids
    same_row = segment[:, None] == segment[None, :]
    causal = position[:, None] >= position[None, :]
    allowed = {"full_attention": same_row & causal}
    layer_types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    in_window = (position[:, None] - position[None, :] < window) if window else None
    if "sliding_attention" in layer_types and window:
        allowed["sliding_attention"] = allowed["full_attention"] & in_window
    elif not layer_types and window:  # Mistral-style: one sliding window for every layer
        allowed["full_attention"] = allowed["full_attention"] & in_window
    if implementation == "eager":
        minimum = torch.finfo(torch.float32).min
        masks = {
            k: torch.zeros(v.shape, device=v.device).masked_fill(~v, minimum) for k, v in allowed.items()
        }
    else:  # sdpa (and the others that read a boolean mask: True = attend)
        masks = allowed
    masks = {k: v[None, None] for k, v in masks.items()}
    return masks if len(masks) > 1 or layer_types - {"full_attention"} else masks["full_attention"]
