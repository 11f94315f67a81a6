"""Stage two: train the student offline from logprob stores (Lightning OPD). No teacher is loaded.

    lopd train --student runs/sft --stores runs/store --out runs/opd --steps 100 --lr 1e-5
    accelerate launch -m lightning_opd.cli train ...          # several GPUs (DDP/FSDP/DeepSpeed)
    lopd train ... --horizon fraction --horizon-fraction 0.1   # TOPD at 10% of the store's horizon
    lopd train ... --horizon staircase --horizon-h0 16 --horizon-dh 16 --horizon-dk 20   # POPD
    lopd train ... --preset esr            # ESR: horizon fixed at 100 + top-k reverse KL (top-k store)
    lopd train ... --ref-kl-coef 0.01 --gold-nll-coef 0.1 --gold-prompts prompts/opd.jsonl   # StableOPD

Writes into ``--out``: ``config.json``, ``metrics.jsonl`` (one row per step), ``checkpoints/step-N``
(model, optimizer, scheduler, RNG and reader position: a rerun of the same command resumes exactly),
and ``final/`` (a ``save_pretrained`` directory with provenance: the stores it was trained on and the
chain back to the SFT teacher).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lightning_opd.config import check, parse_number_list, prepare_output_dir, to_dict, write_json_atomic
from lightning_opd.consistency import check_store_for_training
from lightning_opd.errors import ConfigError, StoreError, TrainingError
from lightning_opd.evaluation import VERIFIERS, evaluate_model
from lightning_opd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lightning_opd.horizons import HorizonConfig, check_horizon, horizon_at, horizon_from_flags
from lightning_opd.modeling import load_causal_lm
from lightning_opd.objectives import make_objective
from lightning_opd.online import GoldSolutions, with_gold
from lightning_opd.prompts import load_prompts, prompt_set_hash
from lightning_opd.provenance import Provenance, read_provenance, write_provenance
from lightning_opd.store import RolloutStream, RowFilter, open_store
from lightning_opd.store.rowcheck import check_rows
from lightning_opd.trainer import MetricsLog, check_finite, collate, format_status, student_token_batch, timer

# Fields that may change between a run and its resume without making it another run.
RESUMABLE_FIELDS = {
    "steps",
    "eval_every",
    "save_every",
    "log_every",
    "resume",
    "overwrite",
    "keep_checkpoints",
}

PRESETS = ("", "esr")
ESR_HORIZON = 100  # METHODS §4: flat for N in 50-200, worse at N <= 20


@dataclass
class TrainConfig:
    student: str = field(metadata={"help": "the student that sampled the store (stage one's --student)"})
    stores: str = field(metadata={"help": "logprob store directories, comma-separated"})
    out: str = field(metadata={"help": "output directory"})
    store_weights: str = field(
        default="", metadata={"help": "mixing weights for several stores, comma-separated"}
    )
    objective: str = field(default="lightning", metadata={"help": "lightning | opd_plus | topk"})
    divergence: str = field(
        default="reverse_kl", metadata={"help": "opd_plus: reverse_kl|forward_kl|jsd|hellinger|tv|alpha"}
    )
    alpha: float = 0.5
    stop_gradient: bool = field(default=False, metadata={"help": "opd_plus: use -f(u) instead of w_f(u)"})
    topk_kind: str = field(default="reverse_kl", metadata={"help": "topk: reverse_kl | forward_kl | gjsd"})
    topk_beta: float = 0.5
    topk_tail: str = "renormalize"
    clip_eps: float = field(
        default=0.0, metadata={"help": "PPO clip epsilon (0 = off; with one update per batch the ratio is 1)"}
    )
    importance_weighting: bool = field(
        default=False, metadata={"help": "weight tokens by pi_theta/pi_ref (off in the paper)"}
    )
    sample_reduction: str = field(
        default="sum", metadata={"help": "per-sample token means are summed (paper) or averaged"}
    )
    ref_kl_coef: float = field(
        default=0.0, metadata={"help": "StableOPD: KL to the SFT student (the store's behaviour policy)"}
    )
    gold_nll_coef: float = field(
        default=0.0,
        metadata={"help": "StableOPD: weight of the NLL of gold solutions (needs --gold-prompts)"},
    )
    gold_prompts: str = field(
        default="",
        metadata={"help": "prompt set with a 'solution' per prompt_id: gold solutions mixed into each batch"},
    )
    preset: str = field(
        default="",
        metadata={"help": "esr: horizon fixed at --horizon-tokens (default 100) + top-k reverse KL"},
    )
    horizon: str = field(default="full", metadata={"help": "full | fixed | fraction | staircase | linear"})
    horizon_tokens: int = 0
    horizon_fraction: float = 0.0
    horizon_h0: int = 0
    horizon_dh: int = 0
    horizon_dk: int = 0
    horizon_ramp_steps: int = 0
    steps: int = 100
    batch_size: int = field(default=64, metadata={"help": "rollouts per optimizer step (global)"})
    micro_batch_size: int = field(
        default=64, metadata={"help": "rollouts per forward pass (gradient accumulation)"}
    )
    lr: float = field(
        default=2e-6, metadata={"help": "constant learning rate (paper: 2e-6 for 4-8B students)"}
    )
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (accelerate)"})
    chunk_size: int = field(default=1024, metadata={"help": "positions per LM-head chunk (memory bound)"})
    shuffle_buffer: int = 4096
    finish_reasons: str = field(default="stop,length", metadata={"help": "keep rollouts that ended this way"})
    max_response_tokens: int = 0
    seed: int = 0
    eval_prompts: str = field(
        default="", metadata={"help": "prompt set with answers for periodic evaluation"}
    )
    eval_every: int = 0
    eval_limit: int = 0
    verifier: str = "addition"
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: str = field(
        default="auto", metadata={"help": "auto (latest checkpoint in --out) | never | a checkpoint dir"}
    )
    overwrite: bool = False

    def __post_init__(self):
        check(self.steps > 0, f"steps must be positive, got {self.steps}")
        check(
            self.batch_size > 0 and self.micro_batch_size > 0,
            f"batch sizes must be positive, got {self.batch_size}/{self.micro_batch_size}",
        )
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(
            self.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision: got {self.mixed_precision!r}"
        )
        check(
            self.verifier in VERIFIERS, f"verifier must be one of {sorted(VERIFIERS)}, got {self.verifier!r}"
        )
        check(self.ref_kl_coef >= 0, f"ref_kl_coef must be >= 0, got {self.ref_kl_coef}")
        check(self.gold_nll_coef >= 0, f"gold_nll_coef must be >= 0, got {self.gold_nll_coef}")
        check(
            not (self.gold_nll_coef > 0 and not self.gold_prompts),
            f"gold_nll_coef={self.gold_nll_coef} needs --gold-prompts (a prompt set with a 'solution' per prompt)",
        )
        check(self.preset in PRESETS, f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "esr":
            self.apply_esr_preset()
        self.horizon_config()
        self.build_objective()
        parse_number_list(self.store_weights, float, "--store-weights", minimum=0)

    def apply_esr_preset(self) -> None:
        """ESR (METHODS §4) = a fixed horizon N (default 100) + the top-k reverse KL over those positions.

        Written into the config itself, so config.json shows what ran and reloading it is idempotent.
        """
        check(
            self.horizon in ("full", "fixed"),
            f"--preset esr fixes the horizon; drop --horizon {self.horizon} (use --horizon-tokens to change N)",
        )
        check(
            self.objective in ("lightning", "topk"),
            f"--preset esr trains the top-k objective; drop --objective {self.objective}",
        )
        self.horizon, self.horizon_tokens = "fixed", self.horizon_tokens or ESR_HORIZON
        self.objective = "topk"

    @property
    def store_paths(self) -> list[str]:
        return [s for s in self.stores.split(",") if s]

    def horizon_config(self) -> HorizonConfig:
        return horizon_from_flags(self)

    def build_objective(self):
        if self.objective == "lightning":
            kwargs = {"clip_eps": self.clip_eps or None, "importance_weighting": self.importance_weighting}
        elif self.objective == "opd_plus":
            kwargs = {"divergence": self.divergence, "alpha": self.alpha, "stop_gradient": self.stop_gradient}
        elif self.objective == "topk":
            kwargs = {"kind": self.topk_kind, "beta": self.topk_beta, "tail": self.topk_tail}
        else:
            raise ConfigError(f"objective must be lightning | opd_plus | topk, got {self.objective!r}")
        return make_objective(
            self.objective,
            sample_reduction=self.sample_reduction,
            ref_kl_coef=self.ref_kl_coef,
            gold_nll_coef=self.gold_nll_coef,
            **kwargs,
        )

    def run_id(self) -> str:
        identity = {k: v for k, v in to_dict(self).items() if k not in RESUMABLE_FIELDS}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def open_stores(config: TrainConfig, student_fingerprint: str):
    paths = config.store_paths
    if not paths:
        raise StoreError("no store given; pass --stores DIR[,DIR...]")
    stores = [open_store(p) for p in paths]
    for store in stores:
        if store.kind != "scored":
            raise StoreError(
                f"{store.root} is a rollouts store with no teacher log-probs; run `lopd score` on it first"
            )
        check_store_for_training(store.manifest, student_fingerprint, config.student)
    topks = {store.topk for store in stores}
    objective = config.build_objective()
    if objective.needs_topk and (None in topks or len(topks) != 1):
        raise StoreError(
            f"objective {config.objective!r} needs stores with teacher top-k (all the same k); got k={sorted(map(str, topks))}"
        )
    weights = [float(w) for w in config.store_weights.split(",")] if config.store_weights else None
    if weights is not None and len(weights) != len(stores):
        raise ConfigError(f"--store-weights has {len(weights)} values for {len(stores)} stores")
    store_horizon = min(int(store.manifest.horizon) for store in stores)
    check_horizon(config.horizon_config(), store_horizon)
    return stores, weights, store_horizon, (topks.pop() if objective.needs_topk else None)


def find_checkpoint(config: TrainConfig) -> Path | None:
    if config.resume == "never":
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if not (path / "trainer_state.json").exists():
            raise TrainingError(f"--resume {path} is not a checkpoint (no trainer_state.json)")
        return path
    checkpoints = sorted(
        (Path(config.out) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])
    )
    complete = [p for p in checkpoints if (p / "trainer_state.json").exists()]  # written last: marks it whole
    return complete[-1] if complete else None


def restore_checkpoint(accelerator, checkpoint: Path, run_id: str) -> dict:
    """Load model, optimizer, scheduler and RNG from ``checkpoint``; refuse one written by another run."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["run_id"] != run_id:
        raise TrainingError(
            f"checkpoint {checkpoint} belongs to another run (run id {state['run_id']}, this run {run_id}); "
            "resume with the config that wrote it, or pass --resume never / a new --out"
        )
    accelerator.load_state(str(checkpoint))
    return state


def save_checkpoint(accelerator, out: Path, step: int, stream, run_id: str, keep: int) -> None:
    accelerator.wait_for_everyone()
    path = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json_atomic(
            path / "trainer_state.json", {"step": step, "run_id": run_id, "stream": stream.state_dict()}
        )
        older = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for old in older:
            shutil.rmtree(old, ignore_errors=True)


def run(config: TrainConfig, log=print) -> Path:
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    out = Path(config.out)
    if accelerator.is_main_process:
        prepare_output_dir(out, config, overwrite=config.overwrite, ignore=frozenset(RESUMABLE_FIELDS))
    accelerator.wait_for_everyone()
    student_fp = model_fingerprint(config.student)
    stores, weights, store_horizon, topk = open_stores(config, student_fp)
    set_seed(config.seed)
    model, tokenizer = load_causal_lm(config.student, dtype="float32", device=str(accelerator.device))
    model.train()
    objective = config.build_objective()
    gold = GoldSolutions.load(config.gold_prompts, tokenizer) if config.gold_nll_coef > 0 else None
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, as in the paper
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    row_filter = RowFilter(
        finish_reasons=tuple(r for r in config.finish_reasons.split(",") if r),
        max_response_length=config.max_response_tokens or None,
    )
    stream = RolloutStream(
        stores, weights, shuffle_buffer=config.shuffle_buffer, seed=config.seed, row_filter=row_filter
    )
    start_step, run_id = 0, config.run_id()
    checkpoint = find_checkpoint(config)
    if checkpoint is not None:
        state = restore_checkpoint(accelerator, checkpoint, run_id)
        stream.load_state_dict(state["stream"])
        start_step = int(state["step"])
        log(f"stage 2: resumed from {checkpoint} at step {start_step}")
    metrics = (
        MetricsLog(out / "metrics.jsonl", truncate_after_step=start_step)
        if accelerator.is_main_process
        else None
    )
    eval_records = (
        load_prompts(config.eval_prompts, limit=config.eval_limit or None) if config.eval_prompts else None
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.batch_size % world:
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by the number of processes {world}"
        )
    log(
        f"stage 2: {sum(s.num_rows for s in stores)} stored rollouts, horizon T={store_horizon}, objective {config.objective}, no teacher loaded"
    )
    started = timer()
    for step in range(start_step, config.steps):
        t0 = timer()
        horizon = horizon_at(config.horizon_config(), step, store_horizon)
        # Every rank reads the same global batch and keeps its own slice: no sampler state to sync.
        global_rows = [next(stream) for _ in range(config.batch_size)]
        check_rows(global_rows, stores, len(tokenizer))  # ids in the vocabulary, finite log-probs <= 0
        rows = global_rows[rank::world]
        micro = [rows[i : i + config.micro_batch_size] for i in range(0, len(rows), config.micro_batch_size)]
        totals: dict[str, float] = {}
        loss_sum, tokens, response_tokens = 0.0, 0, 0
        seen_gold: set[str] = set()  # StableOPD: one gold solution per prompt per step
        for j, chunk in enumerate(micro):
            batch = collate(chunk, horizon, tokenizer.pad_token_id, topk).to(accelerator.device)
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = accelerator.no_sync(model) if j < len(micro) - 1 else nullcontext()
            with sync, accelerator.autocast():
                token_batch = student_token_batch(
                    model, batch, needs_topk=objective.needs_topk, chunk_size=config.chunk_size
                )
                if gold is not None:
                    gold_rows = gold.rows_for(chunk, seen_gold)
                    token_batch = with_gold(
                        token_batch, model, gold_rows, tokenizer.pad_token_id, config.chunk_size
                    )
                loss, parts = objective(token_batch)
                if config.sample_reduction == "mean":
                    loss = loss * len(chunk) / len(rows)  # mean over the whole batch, not per micro-batch
                check_finite(loss, step + 1, batch)
                accelerator.backward(loss)
            loss_sum += loss.item()
            tokens += int(batch.attention_mask.sum())
            response_tokens += batch.num_tokens
            for k, v in parts.items():  # objective metrics, averaged over micro-batches by rows
                if k != "tokens":
                    totals[k] = totals.get(k, 0.0) + v * len(chunk) / len(rows)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            raise TrainingError(
                f"non-finite gradient norm at step {step + 1}; no checkpoint was written. Lower --lr"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = timer() - t0
        row = {
            **totals,
            "step": step + 1,
            "horizon": horizon,
            "loss": loss_sum,
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "tokens": tokens * world,
            "tokens_per_s": tokens * world / elapsed,
            "response_tokens": response_tokens * world,
            "step_time_s": elapsed,
            "elapsed_s": timer() - started,
        }
        if (
            eval_records
            and config.eval_every
            and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps)
        ):
            row["eval_accuracy"] = evaluate(
                accelerator, model, tokenizer, eval_records, config, store_horizon
            )
        if metrics is not None:
            metrics.write(row)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                log(format_status(row))
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_checkpoint(accelerator, out, step + 1, stream, run_id, config.keep_checkpoints)
    if metrics is not None:
        metrics.close()
    return save_final(accelerator, model, tokenizer, config, stores, out, log)


def evaluate(accelerator, model, tokenizer, records, config: TrainConfig, horizon: int) -> float:
    unwrapped = accelerator.unwrap_model(model)
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


def write_final_model(
    accelerator, model, tokenizer, final: Path, *, stage: str, config, inputs: dict
) -> None:
    """Save the trained student with provenance (main process only): its fingerprint, its config, what it
    was trained on, and its parent's provenance, so the chain back to the SFT teacher stays intact."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(final, state_dict=accelerator.get_state_dict(model))
    tokenizer.save_pretrained(final)
    parent = read_provenance(config.student)
    write_provenance(
        final,
        Provenance(
            stage=stage,
            model_fingerprint=model_fingerprint(final),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            # The consistency anchor carries over: this model's SFT teacher is its parent's.
            sft_teacher=parent.sft_teacher if parent else None,
            config=asdict(config),
            parent=parent.__dict__ if parent else None,
            inputs=inputs,
        ),
    )


def save_final(accelerator, model, tokenizer, config: TrainConfig, stores, out: Path, log) -> Path:
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        stores_input = [
            {
                "path": str(s.root),
                "store_id": s.store_id,
                "manifest_sha256": _sha256(s.root / "manifest.json"),
            }
            for s in stores
        ]
        inputs = {**_gold_input(config), "stores": stores_input}
        write_final_model(
            accelerator, model, tokenizer, final, stage="lightning_opd", config=config, inputs=inputs
        )
        log(f"stage 2: trained student saved to {final}")
    return final


def _gold_input(config: TrainConfig) -> dict:
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
