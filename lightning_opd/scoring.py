"""Scoring whole sequences: the stage-one teacher (and behaviour-policy) scoring call.

``score_sequences`` runs the model over prompt + response in length-bucketed batches under a token
budget (right padding), and computes logits only at response positions, through the chunked kernels
of ``lightning_opd.logprobs`` (never a full ``[batch, seq, vocab]`` tensor in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_opd.config import check
from lightning_opd.errors import InputError
from lightning_opd.logprobs import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_TOKENS_PER_BATCH,
    final_hidden_states,
    logit_postprocess,
    output_head,
    text_config,
    token_logprobs_from_hidden,
    topk_logprobs_from_hidden,
    verify_output_head,
)
from lightning_opd.packing import block_diagonal_mask

# ----------------------------------------------------------------------------------------------
# Scoring whole sequences (stage one)


@dataclass
class ScoredSequence:
    """Scores of one response. ``logprobs[t] = log π(y_t | prompt, y_<t)``; top-k fields when asked."""

    logprobs: np.ndarray  # float32 [len(response)]
    topk_ids: np.ndarray | None = None  # int32 [len(response), k]
    topk_logprobs: np.ndarray | None = None  # float32 [len(response), k]


def plan_batches(
    lengths: Sequence[int], max_tokens_per_batch: int, *, packed: bool = False
) -> list[list[int]]:
    """Group indices into batches of similar length whose computed size fits the token budget.

    Longest first (an out-of-memory shows up on the first batch, not after an hour). A padded batch
    costs ``count × longest`` because right padding is computed too; a packed one the sum of its
    lengths. A sequence longer than the budget gets a batch of its own rather than an error.
    """
    check(max_tokens_per_batch >= 1, f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            cost = (
                sum(lengths[j] for j in batch) + lengths[i]
                if packed
                else (len(batch) + 1) * lengths[batch[0]]
            )
            if cost <= max_tokens_per_batch:
                batch.append(i)
                continue
        batches.append([i])
    return batches


def _collate(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    batch: list[int],
    pad_id: int,
    device,
    vocab: int,
):
    """Right-padded ``input_ids``/``attention_mask`` plus flat (row, position, target) of response tokens."""
    seqs = [list(prompts[i]) + list(responses[i]) for i in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, positions, targets = [], [], []
    for r, (i, seq) in enumerate(zip(batch, seqs)):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
        p, n = len(prompts[i]), len(responses[i])
        # Response token t is predicted by the hidden state one position earlier.
        rows.extend([r] * n)
        positions.extend(range(p - 1, p - 1 + n))
        targets.extend(responses[i])
    # Checked on the CPU batch (vectorised): an out-of-range id would index garbage in the embedding.
    real = ids[mask.bool()]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
        raise InputError(
            f"sequences {batch[:5]}...: token ids outside [0, {vocab}) for this model; wrong tokenizer?"
        )
    as_long = {"dtype": torch.long, "device": device}
    return (
        ids.to(device),
        mask.to(device),
        torch.tensor(rows, **as_long),
        torch.tensor(positions, **as_long),
        torch.tensor(targets, **as_long),
    )


def _packed(ids: Tensor, mask: Tensor, rows: Tensor, positions: Tensor, config):
    """A padded batch from ``_collate`` as one sequence (``lightning_opd.packing``), and where its
    response states are in it: ``(input_ids, position_ids, attention_mask, flat positions)``."""
    lengths = mask.sum(dim=1)
    starts = torch.cumsum(lengths, 0) - lengths
    keep = mask.bool()
    segment = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)[keep]
    position = (torch.cumsum(mask, dim=1) - 1)[keep]
    attention = block_diagonal_mask(segment, position, config)
    return ids[keep][None], position[None], attention, starts[rows] + positions


def _validate_inputs(prompts, responses, topk: int, vocab: int) -> None:
    if len(prompts) != len(responses):
        raise InputError(
            f"got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt"
        )
    check(0 <= topk <= vocab, f"topk must be in [0, vocab={vocab}], got {topk}")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0 and len(r) > 0:
            raise InputError(
                f"sequence {i} has an empty prompt: its first response token would have no context; "
                "give every prompt at least one token (e.g. BOS)"
            )


def _model_device(model, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pad_id(model) -> int:
    pad = getattr(text_config(model.config), "pad_token_id", None)
    return int(pad) if pad is not None else 0  # any id works: padded positions are masked and unused


def score_sequences(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    topk: int = 0,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device=None,
    progress: Callable[[int], None] | None = None,
    packed: bool = False,
) -> list[ScoredSequence]:
    """Score every response token under ``model`` (raw logits, temperature 1), in input order.

    ``logprobs[t]`` of sequence i is ``log π(responses[i][t] | prompts[i], responses[i][:t])``.
    Logits are computed only at response positions, in chunks (see module docstring). Batches are
    filled up to ``max_tokens_per_batch`` tokens *including* padding. ``device`` is where inputs
    go (default: the device of the model's first parameter). ``progress`` is called with the number
    of sequences finished after each batch (``tqdm.update`` fits). Dropout is off while scoring.
    ``packed``: each batch runs as one sequence with a block-diagonal mask (no padding computed; the
    budget then counts the sum of the lengths): the same log-probs.
    """
    weight, bias = output_head(model)
    vocab = weight.shape[0]
    _validate_inputs(prompts, responses, topk, vocab)
    device = _model_device(model, device)
    postprocess = logit_postprocess(model)
    results: list[ScoredSequence | None] = [None] * len(prompts)
    todo = []
    for i, r in enumerate(responses):
        if len(r) == 0:
            results[i] = _empty_scored(topk)
        else:
            todo.append(i)
    lengths = [len(prompts[i]) + len(responses[i]) for i in range(len(prompts))]
    planned = plan_batches([lengths[i] for i in todo], max_tokens_per_batch, packed=packed)
    batches = [[todo[j] for j in b] for b in planned]

    was_training = model.training
    model.eval()  # dropout would make the scores random
    try:
        with torch.inference_mode():
            for n, batch in enumerate(batches):
                ids, mask, rows, positions, targets = _collate(
                    prompts, responses, batch, _pad_id(model), device, vocab
                )
                if n == 0:
                    verify_output_head(model, ids, postprocess)
                if packed:
                    ids, position_ids, attention, flat = _packed(
                        ids, mask, rows, positions, text_config(model.config)
                    )
                    states = final_hidden_states(model, ids, attention, position_ids)
                    rows, positions = torch.zeros_like(flat), flat
                else:
                    states = final_hidden_states(model, ids, mask)
                # Keep only response states ([N, H]); with a device map the head may live elsewhere.
                hidden = states[rows.to(states.device), positions.to(states.device)].to(weight.device)
                targets = targets.to(weight.device)
                lps = token_logprobs_from_hidden(
                    hidden, weight, targets, bias=bias, chunk_size=chunk_size, postprocess=postprocess
                )
                top = None
                if topk:
                    top = topk_logprobs_from_hidden(
                        hidden, weight, topk, bias=bias, chunk_size=chunk_size, postprocess=postprocess
                    )
                _scatter_results(results, batch, responses, lps, top)
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _empty_scored(topk: int) -> ScoredSequence:
    if not topk:
        return ScoredSequence(np.zeros(0, np.float32))
    return ScoredSequence(
        np.zeros(0, np.float32), np.zeros((0, topk), np.int32), np.zeros((0, topk), np.float32)
    )


def _scatter_results(results, batch, responses, lps: Tensor, top) -> None:
    lps = lps.cpu().numpy()  # one device->host copy per batch, not per sequence
    top_ids = top[0].cpu().numpy() if top is not None else None
    top_lps = top[1].cpu().numpy() if top is not None else None
    start = 0
    for i in batch:
        end = start + len(responses[i])
        results[i] = ScoredSequence(
            lps[start:end].copy(),
            top_ids[start:end].copy() if top_ids is not None else None,
            top_lps[start:end].copy() if top_lps is not None else None,
        )
        start = end


def bare_forward(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    device=None,
) -> int:
    """``model(...).logits`` (full logits, no log-softmax) on the batches ``score_sequences`` would use.

    For benchmarks: the cost floor scoring is compared with. Returns the number of response tokens.
    """
    device = _model_device(model, device)
    todo = [i for i, r in enumerate(responses) if len(r)]
    lengths = [len(prompts[i]) + len(responses[i]) for i in todo]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in plan_batches(lengths, max_tokens_per_batch):
                batch = [todo[j] for j in batch]
                ids, mask, *_ = _collate(
                    prompts, responses, batch, _pad_id(model), device, output_head(model)[0].shape[0]
                )
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                del logits  # freed before the next batch, as scoring frees its chunks
    finally:
        model.train(was_training)
    return sum(len(responses[i]) for i in todo)
