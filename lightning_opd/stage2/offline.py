"""One offline update step, in-training evaluation and the final model of ``lopd train``: the parts of
stage two's loop that follow the config down (``pipelines/train.py`` keeps the set-up and the loop)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lightning_opd.evaluation.accuracy import evaluate_model
from lightning_opd.prompts import load_prompts, prompt_set_hash
from lightning_opd.stage2 import runs
from lightning_opd.stage2.horizons import horizon_at
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients, apply_update


def offline_step(
    accelerator,
    model,
    optimizer,
    scheduler,
    stream,
    inputs: UpdateInputs,
    config,
    step: int,
    store_horizon,
    check_batch=None,
) -> dict:
    """One optimizer step on the next ``batch_size`` stored rollouts (0-based ``step``). ``check_batch``
    sees this process's rows first (stage two's row check: a bad stored row stops the run, named)."""
    t0 = runs.timer()
    inputs.horizon = horizon_at(config.horizon_config(), step, store_horizon)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Every rank walks the same global batch and decodes only its own slice (the stream hands out the
    # others' rows as prompt_id stubs): no sampler state to sync, one rank's memory for its rows.
    global_rows = [next(stream) for _ in range(config.batch_size)]
    rows = global_rows[rank::world]
    if check_batch is not None:
        check_batch(rows)
    # StableOPD: a prompt's one gold solution goes to the rank of its first rollout in the batch.
    first = {}
    for i, r in enumerate(global_rows):
        first.setdefault(r["prompt_id"], i)
    elsewhere = frozenset(p for p, i in first.items() if i % world != rank)
    stats = accumulate_gradients(
        model, rows, inputs, step=step + 1, accelerator=accelerator, gold_seen=elsewhere
    )
    update = apply_update(accelerator, model, optimizer, scheduler, config.grad_clip, step)
    elapsed = runs.timer() - t0
    tokens, response_tokens = stats.pop("tokens"), stats.pop("response_tokens")
    return {
        **stats,
        "step": step + 1,
        "horizon": inputs.horizon,
        **update,
        "tokens": tokens,  # over all processes
        "tokens_per_s": tokens / elapsed,
        "response_tokens": response_tokens,
        "step_time_s": elapsed,
    }


def evaluate(accelerator, model, tokenizer, records, config, horizon: int) -> float:
    unwrapped = accelerator.unwrap_model(model).model  # the student inside the StudentScorer
    unwrapped.eval()
    result = evaluate_model(
        unwrapped,
        tokenizer,
        records,
        model_name="student",
        verifier=config.verifier,
        max_new_tokens=horizon,
        backend="transformers",
    )
    unwrapped.train()
    return result.greedy_accuracy


def save_final(accelerator, model, tokenizer, config, stores, out: Path, log) -> Path:
    accelerator.wait_for_everyone()
    final = out / "final"
    stores_input = [
        {"path": str(s.root), "store_id": s.store_id, "manifest_sha256": _sha256(s.root / "manifest.json")}
        for s in stores
    ]
    inputs = {**_gold_input(config), "stores": stores_input}
    # Every process calls it (gathering the weights may be collective); only the main one writes.
    runs.write_final_model(
        accelerator, model, tokenizer, final, stage="lightning_opd", config=config, inputs=inputs
    )
    if accelerator.is_main_process:
        log(f"stage 2: trained student saved to {final}")
    accelerator.wait_for_everyone()  # final/ is whole before any process returns
    return final


def _gold_input(config) -> dict:
    if not config.gold_nll_coef:
        return {}
    return {
        "gold_prompts": {
            "path": config.gold_prompts,
            "content_hash": prompt_set_hash(load_prompts(config.gold_prompts)),
        }
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
