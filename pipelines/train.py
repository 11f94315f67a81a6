"""Stage two: train the student offline from logprob stores (Lightning OPD). No teacher is loaded.

    lopd train --student runs/sft --stores runs/store --out runs/opd --steps 100 --lr 1e-5
    accelerate launch --multi_gpu --num_processes 8 -m lightning_opd.cli train ...   # 8 GPUs, DDP
        # --batch-size stays global (each process trains on its slice).
        # On CPU: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ... (DDP over gloo, as tested)
    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m lightning_opd.cli train ...  # FSDP2
        # (lightning_opd/stage2/sharding.py: what is sharded, precision; FSDP1/DeepSpeed are refused)
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

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import DistributedDataParallelKwargs, set_seed

from lightning_opd.config import check, parse_number_list, prepare_output_dir
from lightning_opd.errors import ConfigError, StoreError
from lightning_opd.models.consistency import check_store_for_training
from lightning_opd.models.fingerprint import model_fingerprint
from lightning_opd.models.loading import load_causal_lm
from lightning_opd.packing import resolve_attn_implementation
from lightning_opd.plan import fit_warning
from lightning_opd.progress import step_bar
from lightning_opd.scale import prepare_student
from lightning_opd.stage2 import runs
from lightning_opd.stage2.batch import StudentScorer
from lightning_opd.stage2.drift import DriftWatch
from lightning_opd.stage2.flags import RESUMABLE_FIELDS, TrainingFlags, warn_unused_objective_flags
from lightning_opd.stage2.gold import GoldSolutions
from lightning_opd.stage2.horizons import check_horizon
from lightning_opd.stage2.offline import evaluate, offline_step, save_final
from lightning_opd.stage2.sharding import training_accelerator
from lightning_opd.stage2.step import make_optimizer, update_inputs
from lightning_opd.store import RolloutStream, RowFilter, open_store
from lightning_opd.store.rowcheck import check_rows
from lightning_opd.tracking import RunTracker
from storage_schemas import logprob_store_v1 as fmt

PRESETS = ("", "esr")
ESR_HORIZON = 100  # METHODS §4: flat for N in 50-200, worse at N <= 20


@dataclass
class TrainConfig(TrainingFlags):
    """``lopd train``: the shared training flags (``TrainingFlags``) plus the stores and their reader."""

    student: str = field(metadata={"help": "the student that sampled the store (stage one's --student)"})
    stores: str = field(metadata={"help": "logprob store directories, comma-separated"})
    out: str = field(metadata={"help": "output directory"})
    store_weights: str = field(
        default="", metadata={"help": "mixing weights for several stores, comma-separated"}
    )
    preset: str = field(
        default="",
        metadata={"help": "esr: horizon fixed at --horizon-tokens (default 100) + top-k reverse KL"},
    )
    batch_size: int = field(default=64, metadata={"help": "rollouts per optimizer step (global)"})
    # Offline, the student drifts from the policy that wrote the store: the trust region is on.
    trust_region: float = field(
        default=0.2,
        kw_only=True,  # redefines TrainingFlags' keyword-only field with the offline default
        metadata={
            "help": "PPO clip of pi_theta/pi_ref at [1-eps, 1+eps], pi_ref = the store's policy (0 = off)"
        },
    )
    drift_max_passes: float = field(
        default=2.0, metadata={"help": "warn when the store is reused beyond this many passes"}
    )
    drift_max_kl: float = field(
        default=0.015,
        metadata={
            "help": "warn when KL(student || store policy) per token, mean of the last 10 steps, exceeds this"
        },
    )
    shuffle_buffer: int = 4096
    shuffle_buffer_mb: int = 1024
    finish_reasons: str = field(default="stop,length", metadata={"help": "keep rollouts that ended this way"})
    max_response_tokens: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1 row, got {self.shuffle_buffer}")
        check(self.shuffle_buffer_mb >= 1, f"shuffle_buffer_mb must be >= 1, got {self.shuffle_buffer_mb}")
        check(
            not (self.gold_nll_coef > 0 and not self.gold_prompts),
            f"gold_nll_coef={self.gold_nll_coef} needs --gold-prompts (a prompt set with a 'solution' per prompt)",
        )
        check(self.preset in PRESETS, f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "esr":
            self.apply_esr_preset()
        self.horizon_config()
        self.build_objective()
        warn_unused_objective_flags(self)
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
    coarse = [str(s.root) for s in stores if fmt.sorted_topk(s.manifest.encoding)]
    if coarse and getattr(objective, "tail", None) == "tail_bucket":
        # log(1 − Σ top-k) cancels catastrophically when the top-k holds nearly all the mass: a 1/64-nat
        # rounding moves that KL by 0.1-0.7 on a real store (BENCHMARKS.md, compact top-k).
        warnings.warn(
            f"--topk-tail tail_bucket on a compact top-k store ({', '.join(coarse)}: top-k log-probs within "
            "1/(2·topk_scale) nats) is ill-conditioned; use --topk-tail renormalize, or a store compacted "
            "without --topk-scale",
            stacklevel=2,
        )
    weights = [float(w) for w in config.store_weights.split(",")] if config.store_weights else None
    if weights is not None and len(weights) != len(stores):
        raise ConfigError(f"--store-weights has {len(weights)} values for {len(stores)} stores")
    store_horizon = min(int(store.manifest.horizon) for store in stores)
    check_horizon(config.horizon_config(), store_horizon)
    return stores, weights, store_horizon, (topks.pop() if objective.needs_topk else None)


def run(config: TrainConfig, log=print) -> Path:
    # DDP broadcasts buffers at every forward (a collective); with StableOPD's gold solutions one process
    # may run a second forward in a micro-batch where another runs none, and mismatched collectives
    # hang. The buffers (rotary tables) are constants loaded identically everywhere: no broadcast.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    tracker = RunTracker.for_run(config, "lopd-train")  # --report-to; refuses a tracker not installed
    accelerator = training_accelerator(  # refuses FSDP1 etc.
        config.mixed_precision, kwargs_handlers=[ddp], **tracker.accelerator_kwargs()
    )
    if accelerator.is_fsdp2 and config.max_tokens_per_micro_batch:
        raise ConfigError(
            "--max-tokens-per-micro-batch is not available under FSDP2 yet (processes would run different "
            "numbers of forwards, each a collective); use --micro-batch-size with --pack"
        )
    if accelerator.is_fsdp2 and config.eval_prompts:
        raise ConfigError(
            "--eval-prompts is not available under FSDP2 (generation would run on sharded weights on every "
            "process); drop it and evaluate the trained model with `lopd eval --model OUT/final ...`"
        )
    if not accelerator.is_main_process:  # one copy of each message under accelerate launch
        log = _quiet
    out = Path(config.out)
    if accelerator.is_main_process:
        prepare_output_dir(out, config, overwrite=config.overwrite, ignore=RESUMABLE_FIELDS)
    accelerator.wait_for_everyone()
    tracker.start(accelerator)  # into --out, which now holds config.json
    student_fp = model_fingerprint(config.student)
    stores, weights, store_horizon, topk = open_stores(config, student_fp)
    # Before any data or weights: say so when the memory plan says this will not fit the GPU.
    # The store's horizon bounds the responses; prompts come on top, so this is a lower bound.
    tokens = config.max_tokens_per_micro_batch or config.micro_batch_size * store_horizon
    if accelerator.is_main_process:
        warning = fit_warning(
            config, tokens=tokens, gpus=accelerator.num_processes, device=accelerator.device
        )
        if warning:
            log(warning)
    set_seed(config.seed)
    # fp32 master weights whatever --mixed-precision says: bf16 weights barely move at lr 2e-6.
    attention = resolve_attn_implementation(config.attn_implementation, accelerator.device)
    model, tokenizer = load_causal_lm(
        config.student, dtype="float32", device=str(accelerator.device), attn_implementation=attention
    )
    model = prepare_student(model, config)  # gradient checkpointing, LoRA adapters
    model.train()
    objective = config.build_objective()
    gold = GoldSolutions.load(config.gold_prompts, tokenizer) if config.gold_nll_coef > 0 else None
    optimizer, scheduler = make_optimizer(model, config)
    # Prepared (DDP-wrapped) is the scorer, not the bare model: see StudentScorer. From here `model`
    # is the prepared scorer; checkpoints hold its state (the student's keys under "model.").
    model, optimizer, scheduler = accelerator.prepare(StudentScorer(model), optimizer, scheduler)
    row_filter = RowFilter(
        finish_reasons=tuple(r for r in config.finish_reasons.split(",") if r),
        max_response_length=config.max_response_tokens or None,
    )
    # Every process walks the same shuffled order and decodes only its own rows of each batch.
    stream = RolloutStream(
        stores,
        weights,
        shuffle_buffer=config.shuffle_buffer,
        shuffle_buffer_bytes=config.shuffle_buffer_mb * 2**20,
        seed=config.seed,
        row_filter=row_filter,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    run_id = config.run_id()
    start_step, state = runs.resume(accelerator, config, run_id, log, "stage 2")
    if state is not None:
        stream.load_state_dict(state["stream"])
    metrics = (
        runs.MetricsLog(out / "metrics.jsonl", truncate_after_step=start_step, tracker=tracker)
        if accelerator.is_main_process
        else None
    )
    eval_prompts = runs.eval_records(config)
    world = accelerator.num_processes
    if config.batch_size % world:
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by the number of processes {world}"
        )
    inputs = update_inputs(
        config, objective, horizon=store_horizon, pad_id=tokenizer.pad_token_id, topk=topk, gold=gold
    )
    log(
        f"stage 2: {sum(s.num_rows for s in stores)} stored rollouts, horizon T={store_horizon}, objective {config.objective}, no teacher loaded"
    )
    log(f"stage 2: attention {attention}{', packed micro-batches' if config.pack else ''}")
    store_rows = sum(s.num_rows for s in stores)
    watch = DriftWatch(config.drift_max_passes, config.drift_max_kl, trust_region=config.trust_region)
    vocab_size = len(tokenizer)

    def check_batch(rows: list[dict]) -> None:  # ids in the vocabulary, finite log-probs <= 0
        check_rows(rows, stores, vocab_size)

    started = runs.timer()
    for step in step_bar(start_step, config.steps, "stage 2", enabled=accelerator.is_main_process):
        row = offline_step(
            accelerator, model, optimizer, scheduler, stream, inputs, config, step, store_horizon, check_batch
        )
        row["elapsed_s"] = runs.timer() - started
        row["passes"] = (step + 1) * config.batch_size / max(1, store_rows)
        if eval_prompts and runs.due(config.eval_every, step + 1, config.steps):
            # The main process alone (the others wait): one copy of generation's memory, not N.
            if accelerator.is_main_process:
                row["eval_accuracy"] = evaluate(
                    accelerator, model, tokenizer, eval_prompts, config, store_horizon
                )
            accelerator.wait_for_everyone()
        if metrics is not None:
            metrics.write(row)
            watch.check(row, log)
            if runs.due(config.log_every, step + 1, config.steps):
                log(runs.format_status(row))
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            runs.save_checkpoint(accelerator, out, step + 1, stream, run_id, config.keep_checkpoints)
    if metrics is not None:
        metrics.close()
    return save_final(accelerator, model, tokenizer, config, stores, out, log)


def _quiet(*_args) -> None:
    pass
