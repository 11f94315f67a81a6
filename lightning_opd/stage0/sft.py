"""Supervised fine-tuning on (prompt, response) token pairs, loss on response tokens only.

Used by stage zero (the student learns the teacher's answers) and by the toy task's teacher
pre-training (the teacher learns the gold worked solutions). A plain PyTorch loop under accelerate:
mixed precision and ``accelerate launch`` come for free, nothing else is hidden.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from lightning_opd.config import check
from lightning_opd.errors import ConfigError
from lightning_opd.logprobs import (
    final_hidden_states,
    logit_postprocess,
    output_head,
    text_config,
    token_logprobs_from_hidden,
    topk_logprobs_from_hidden,
)
from lightning_opd.packing import micro_batches, pack
from lightning_opd.progress import step_bar
from lightning_opd.scale import make_adamw, trainable_parameters
from lightning_opd.tracking import RunTracker

IGNORE_INDEX = -100


@dataclass
class SFTExample:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS: the model must learn to stop


@dataclass
class SFTTrainConfig:
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (accelerate)
    log_every: int = 50
    # Early stop: end as soon as the teacher-forced exact match on held-out answers reaches this (0 = off).
    # It pins the student's accuracy, where a fixed step count lands anywhere on a steep learning curve.
    stop_at_match: float = 0.0
    check_every: int = 2
    optim: str = "adamw"  # adamw | adamw-8bit (lightning_opd.scale.make_adamw)
    # Gradient accumulation (0 = the whole batch in one forward), or a token budget per forward with
    # the batch's examples grouped by length; ``pack`` concatenates each micro-batch (no padding).
    micro_batch_size: int = 0
    max_tokens_per_micro_batch: int = 0
    pack: bool = False

    def __post_init__(self):
        check(self.steps > 0, f"steps must be positive, got {self.steps}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(
            0 <= self.warmup_steps < self.steps,
            f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}",
        )
        check(
            self.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision: got {self.mixed_precision!r}"
        )
        check(0 <= self.stop_at_match <= 1, f"stop_at_match must be in [0, 1], got {self.stop_at_match}")
        check(self.check_every >= 1, f"check_every must be >= 1, got {self.check_every}")
        check(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        check(
            self.max_tokens_per_micro_batch >= 0,
            f"max_tokens_per_micro_batch must be >= 0 (0 = off), got {self.max_tokens_per_micro_batch}",
        )


def collate_sft(examples: list[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that are IGNORE_INDEX on prompt and padding."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.prompt_ids + e.response_ids
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.response_ids)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def response_nll(model, batch: dict[str, torch.Tensor], *, chunk_size: int = 1024) -> torch.Tensor:
    """Mean next-token NLL over response tokens (labels != IGNORE_INDEX).

    Through the chunked kernels of ``logprobs``: the LM head runs only at response positions,
    ``chunk_size`` positions at a time, and backward recomputes each chunk's logits, so neither
    ``[batch, seq, vocab]`` nor ``[response tokens, vocab]`` fp32 logits are ever held (the first
    out-of-memory of a 150k-vocabulary model otherwise).
    """
    return -response_logprobs(model, batch, chunk_size=chunk_size).mean()


def response_logprobs(model, batch: dict[str, torch.Tensor], *, packed: bool = False, chunk_size: int = 1024):
    """The response tokens' log-probs of a collated batch (``collate_sft``), in row order, from the
    padded batch or from it packed into one sequence (``lightning_opd.packing``: the same values, no
    padding computed)."""
    labels = batch["labels"][:, 1:]  # position t predicts token t+1
    if packed:
        view = SimpleNamespace(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mask=(labels != IGNORE_INDEX).float(),
            targets=labels.clamp(min=0),
        )
        inputs = pack(view, text_config(model.config), needs_topk=False)
        hidden = final_hidden_states(model, inputs.input_ids, inputs.attention_mask, inputs.position_ids)
        hidden, where, targets = hidden[:, :-1], inputs.where, inputs.targets
    else:
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
        where, targets = labels != IGNORE_INDEX, labels
    weight, bias = output_head(model)
    return token_logprobs_from_hidden(
        hidden[where],
        weight,
        targets[where],
        bias=bias,
        chunk_size=chunk_size,
        checkpoint=True,
        postprocess=logit_postprocess(model),
    )


def sft_micro_batches(examples: list[SFTExample], config: SFTTrainConfig) -> list[list[SFTExample]]:
    """One step's examples as micro-batches: all at once, ``micro_batch_size`` at a time, or by token
    budget (``lightning_opd.packing.micro_batches``, longest first)."""
    if config.max_tokens_per_micro_batch:
        rows = [{"prompt_ids": e.prompt_ids, "response_ids": e.response_ids, "example": e} for e in examples]
        horizon = max(len(e.response_ids) for e in examples)
        groups = micro_batches(
            rows,
            horizon=horizon,
            micro_batch_size=len(rows),
            max_tokens=config.max_tokens_per_micro_batch,
            packed=config.pack,
        )
        return [[r["example"] for r in group] for group in groups]
    size = config.micro_batch_size or len(examples)
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def accumulate_sft_gradients(model, examples, config: SFTTrainConfig, pad_id: int, accelerator=None) -> float:
    """Backward of the mean response-token NLL of ``examples`` through their micro-batches; returns the
    loss. Each micro-batch adds its token sum over the step's response-token count, so the gradient is
    the whole batch's whatever the split. One micro-batch, unpacked, runs ``response_nll`` itself."""
    groups = sft_micro_batches(examples, config)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    backward = accelerator.backward if accelerator is not None else torch.Tensor.backward
    if len(groups) == 1 and not config.pack:  # the single-forward path, bit for bit as before
        batch = {k: v.to(device) for k, v in collate_sft(groups[0], pad_id).items()}
        with autocast():  # the decoder is called directly, past prepare()'s wrapped forward
            loss = response_nll(model, batch)
        backward(loss)
        return loss.item()
    total_tokens = sum(len(e.response_ids) for e in examples)
    loss_sum = 0.0
    for group in groups:
        batch = {k: v.to(device) for k, v in collate_sft(group, pad_id).items()}
        with autocast():
            loss = -response_logprobs(model, batch, packed=config.pack).sum() / total_tokens
        backward(loss)
        loss_sum += loss.item()
    return loss_sum


@torch.no_grad()
def teacher_forced_match(model, examples: list[SFTExample], pad_id: int, *, batch_size: int = 256) -> float:
    """Share of ``examples`` whose every response token is the model's argmax given the gold prefix.

    Greedy decoding reproduces such a response exactly, so this is a lower bound on how often greedy
    decoding writes the teacher's answer, for the cost of one forward pass instead of a generation.
    The argmax goes through the chunked top-1 kernel: no ``[batch, seq, vocab]`` logits.
    """
    weight, bias = output_head(model)
    postprocess = logit_postprocess(model)
    device = next(model.parameters()).device
    matched = 0
    for start in range(0, len(examples), batch_size):
        batch = collate_sft(examples[start : start + batch_size], pad_id)
        hidden = final_hidden_states(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )[:, :-1]
        labels = batch["labels"][:, 1:].to(device)
        where = labels != IGNORE_INDEX
        ids, _ = topk_logprobs_from_hidden(hidden[where], weight, 1, bias=bias, postprocess=postprocess)
        ok = torch.ones_like(labels, dtype=torch.bool)
        ok[where] = ids[:, 0].long() == labels[where]
        matched += int(ok.all(dim=-1).sum())
    return matched / len(examples)


def refuse_several_processes() -> None:
    """Stage zero runs in one process. Its chunked loss calls the decoder past the prepared model's
    forward, so under DDP nothing would all-reduce and each process would train its own copy (stage
    two wraps the same kernel in ``StudentScorer`` for that reason)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by accelerate launch / torchrun for each process
        raise ConfigError(
            "lopd sft runs in one process; start it without `accelerate launch` (stage zero is a short "
            "job; for multi-GPU SFT of a large student, train on its sft_data.jsonl with your SFT trainer)"
        )


def train_sft(
    model,
    examples: list[SFTExample],
    config: SFTTrainConfig,
    *,
    pad_id: int,
    log: Callable[[str], None] = print,
    on_eval: Callable[[int], None] | None = None,
    eval_every: int = 0,
    holdout: list[SFTExample] | None = None,
    tracker: RunTracker | None = None,
) -> list[dict]:
    """Train ``model`` in place; returns the logged metrics (one dict per ``log_every`` steps).

    With ``config.stop_at_match`` set, ``holdout`` (answers never trained on) is checked every
    ``config.check_every`` steps and training ends at the first check that reaches the target; the last
    row then carries ``stopped_early`` and ``val_match``. ``tracker`` (--report-to) gets every row.
    """
    if not examples:
        raise ValueError("no SFT examples to train on")
    if config.stop_at_match > 0 and not holdout:
        raise ConfigError("stop_at_match needs held-out examples to check against (holdout)")
    refuse_several_processes()
    tracker = tracker or RunTracker("none", ".", "lopd-sft")
    accelerator = Accelerator(mixed_precision=config.mixed_precision, **tracker.accelerator_kwargs())
    tracker.start(accelerator)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    optimizer = make_adamw(
        trainable_parameters(model), lr=config.lr, weight_decay=config.weight_decay, optim=config.optim
    )

    def lr_lambda(step: int) -> float:
        # Linear warm-up then cosine decay to 10%: the usual recipe, robust for from-scratch toy models.
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    order: list[int] = []
    history, start, tokens = [], time.time(), 0
    bar = step_bar(0, config.steps, "sft")
    for step in bar:
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[: config.batch_size], order[config.batch_size :]
        chosen = [examples[i] for i in picked]
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_sft_gradients(model, chosen, config, pad_id, accelerator)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        tokens += sum(len(e.prompt_ids) + len(e.response_ids) for e in chosen)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.time() - start
            row = {
                "step": step + 1,
                "loss": loss,
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / elapsed,
                "elapsed_s": elapsed,
            }
            history.append(row)
            tracker.log(row)
            log(
                f"sft step {step + 1}/{config.steps} loss {row['loss']:.4f} gnorm {row['grad_norm']:.2f} "
                f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s {elapsed:.0f}s"
            )
        if on_eval and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            on_eval(step + 1)
            model.train()
        if config.stop_at_match > 0 and ((step + 1) % config.check_every == 0 or step + 1 == config.steps):
            model.eval()
            match = teacher_forced_match(accelerator.unwrap_model(model), holdout, pad_id)
            model.train()
            reached = match >= config.stop_at_match
            if reached or step + 1 == config.steps:
                history.append({"step": step + 1, "loss": loss, "val_match": match, "stopped_early": reached})
                tracker.log(history[-1])
                log(
                    f"sft: held-out exact match {100 * match:.1f}% at step {step + 1}: "
                    + (
                        f"reached the target {100 * config.stop_at_match:.0f}%, stopping"
                        if reached
                        else f"the target {100 * config.stop_at_match:.0f}% was not reached; "
                        "raise --steps or --lr to get there, or lower --stop-at-match"
                    )
                )
                if reached:
                    break
    bar.close()  # also when the early stop left the loop
    model.eval()
    accelerator.unwrap_model(model)
    tracker.finish()  # every row is flushed as it is logged: a failed run loses none
    return history
