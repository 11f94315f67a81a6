"""The training flags of stage two, shared by offline and online training, and the one mapping from
those flags to an objective object.

``TrainingFlags`` holds every flag both trainers take (objective, horizon, optimiser, logging,
checkpoints); ``pipelines/train.py``'s ``TrainConfig`` and ``pipelines/train_online.py``'s
``OnlineConfig`` inherit it and add only what is theirs (stores and the reader; a live teacher and
the sampler). ``objective_from_flags`` is the only place a flag becomes an objective option, and
``OBJECTIVE_FLAGS`` says which flag feeds which option: a test checks that it covers every field of
every objective class, so a new option cannot be silently dropped by one trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from lightning_opd.config import check, field_defaults, to_dict
from lightning_opd.errors import ConfigError
from lightning_opd.evaluation.verifiers import check_verifier
from lightning_opd.packing import ATTN_IMPLEMENTATIONS
from lightning_opd.scale import ScaleFlags
from lightning_opd.stage2.horizons import HorizonConfig, horizon_from_flags
from lightning_opd.stage2.objectives import OBJECTIVES, Objective, make_objective
from lightning_opd.tracking import check_report_to

# objective name -> {objective option: flag}; the Composite options (ref_kl_coef, gold_nll_coef,
# ref_kl_estimator) apply to every objective and are passed separately.
OBJECTIVE_FLAGS: dict[str, dict[str, str]] = {
    "lightning": {
        "clip_eps": "clip_eps",
        "importance_weighting": "importance_weighting",
        "max_importance_weight": "max_importance_weight",
        "trust_region": "trust_region",
        "sample_reduction": "sample_reduction",
    },
    "opd_plus": {
        "divergence": "divergence",
        "alpha": "alpha",
        "stop_gradient": "stop_gradient",
        "log_u_clamp": "log_u_clamp",
        "clip_eps": "clip_eps",
        "importance_weighting": "importance_weighting",
        "max_importance_weight": "max_importance_weight",
        "trust_region": "trust_region",
        "sample_reduction": "sample_reduction",
    },
    "topk": {
        "kind": "topk_kind",
        "beta": "topk_beta",
        "tail": "topk_tail",
        "sample_reduction": "sample_reduction",
    },
}
COMPOSITE_FLAGS = ("ref_kl_coef", "gold_nll_coef", "ref_kl_estimator")

# Fields that may change between a run and its resume without making it another run.
RESUMABLE_FIELDS = frozenset(
    {"steps", "eval_every", "save_every", "log_every", "resume", "overwrite", "keep_checkpoints", "report_to",
     "drift_max_passes", "drift_max_kl"}  # the drift thresholds only decide warnings
)  # fmt: skip


def objective_from_flags(flags, *, on_policy_ref_kl: bool = False) -> Objective:
    """The objective ``flags`` ask for. ``clip_eps`` 0 means no clip.

    ``on_policy_ref_kl``: online training samples from π_θ itself, so StableOPD's KL to π_ref is not
    the objective's offline estimator but ``objectives.on_policy_reference_kl``, added by the update
    step; the objective then leaves it out.
    """
    if flags.objective not in OBJECTIVE_FLAGS:
        raise ConfigError(f"objective must be one of {' | '.join(OBJECTIVE_FLAGS)}, got {flags.objective!r}")
    options = {name: getattr(flags, flag) for name, flag in OBJECTIVE_FLAGS[flags.objective].items()}
    for name in ("clip_eps", "trust_region"):  # 0 = off
        if name in options:
            options[name] = options[name] or None
    return make_objective(
        flags.objective,
        ref_kl_coef=0.0 if on_policy_ref_kl else flags.ref_kl_coef,
        gold_nll_coef=flags.gold_nll_coef,
        ref_kl_estimator=flags.ref_kl_estimator,
        **options,
    )


def warn_unused_objective_flags(flags) -> list[str]:
    """Warn, once per flag, about objective flags set away from their default that the chosen objective
    does not read (e.g. ``--clip-eps`` with ``--objective topk``): they would be ignored silently.
    Returns the warnings (for tests)."""
    used = set(OBJECTIVE_FLAGS[flags.objective].values())
    defaults = {f.name: f.default for f in dataclasses.fields(flags)}
    owners: dict[str, list[str]] = {}
    for objective, options in OBJECTIVE_FLAGS.items():
        for flag in options.values():
            if flag not in used and getattr(flags, flag) != defaults.get(flag):
                owners.setdefault(flag, []).append(objective)
    messages = [
        f"--{flag.replace('_', '-')} applies to --objective {' / '.join(sorted(set(objs)))}; it is ignored "
        f"with --objective {flags.objective}"
        for flag, objs in owners.items()
    ]
    for message in messages:
        warnings.warn(message, stacklevel=3)
    return messages


def _help(text: str, default=dataclasses.MISSING):
    return field(default=default, metadata={"help": text})


@dataclass(kw_only=True)
class TrainingFlags(ScaleFlags):
    """Flags of every stage-two trainer (the memory flags of ``ScaleFlags`` included). Keyword-only, so a
    subclass may add required fields."""

    objective: str = _help("lightning | opd_plus | topk", "lightning")
    divergence: str = _help("opd_plus: reverse_kl|forward_kl|jsd|hellinger|tv|alpha", "reverse_kl")
    alpha: float = _help("opd_plus: alpha of the alpha-divergence", 0.5)
    stop_gradient: bool = _help("opd_plus: use -f(u) instead of w_f(u)", False)
    log_u_clamp: float = _help("opd_plus: clamp of log(pi_T/pi_theta)", 6.0)
    topk_kind: str = _help("topk: reverse_kl | forward_kl | gjsd", "reverse_kl")
    topk_beta: float = _help("topk: beta of gjsd", 0.5)
    topk_tail: str = _help("topk: how the mass outside the teacher's top-k is treated", "renormalize")
    clip_eps: float = _help("PPO clip epsilon (0 = off; with one update per batch the ratio is 1)", 0.0)
    importance_weighting: bool = _help(
        "weight tokens by the truncated ratio to the distribution they were sampled from (off in the paper)",
        False,
    )
    trust_region: float = _help(
        "sampled-token objectives: PPO clip of pi_theta/pi_ref at [1-eps, 1+eps], pi_ref = the policy "
        "that sampled the tokens (0 = off, the paper's update; METHODS §9). lopd train: 0.2",
        0.0,
    )
    max_importance_weight: float = _help("truncation of the importance weight", 2.0)
    sample_reduction: str = _help("per-sample token means are summed (paper) or averaged", "sum")
    ref_kl_coef: float = _help(
        "StableOPD: weight of the KL to pi_ref, the SFT student (offline: the store's behaviour "
        "policy; online: a frozen copy of the initial student)",
        0.0,
    )
    ref_kl_estimator: str = _help("offline ref-KL estimator: kl_theta_ref | kl_ref_theta", "kl_theta_ref")
    gold_nll_coef: float = _help("StableOPD: weight of the NLL of gold solutions", 0.0)
    gold_prompts: str = _help(
        "prompt set with a 'solution' per prompt_id: gold solutions mixed into each batch", ""
    )
    horizon: str = _help("full | fixed | fraction | staircase | linear", "full")
    horizon_tokens: int = 0
    horizon_fraction: float = 0.0
    horizon_h0: int = 0
    horizon_dh: int = 0
    horizon_dk: int = 0
    horizon_ramp_steps: int = 0
    steps: int = 100
    micro_batch_size: int = _help("rollouts per forward pass (gradient accumulation)", 64)
    max_tokens_per_micro_batch: int = _help(
        "token budget per forward pass instead of --micro-batch-size rows: the step's rows grouped by "
        "length, longest first (computed tokens: rows x longest, or their sum with --pack); 0 = off",
        0,
    )
    pack: bool = _help(
        "concatenate each micro-batch's rows into one sequence (no padding; rows kept apart by a "
        "block-diagonal mask, or by flash-attention-2's varlen): the same log-probs and gradient",
        False,
    )
    attn_implementation: str = _help(
        "auto (flash_attention_2 on CUDA when installed, else sdpa) | sdpa | eager | flash_attention_2",
        "auto",
    )
    lr: float = _help("constant learning rate (paper: 2e-6 for 4-8B students)", 2e-6)
    warmup_steps: int = _help(
        "linear learning-rate warmup steps (Adam's first steps move every weight by ~lr)", 0
    )
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixed_precision: str = _help(
        "no | bf16 | fp16 (accelerate autocast over fp32 master weights; bf16 is the GPU default to "
        "choose; fp16 adds a loss scaler that skips overflowed steps)",
        "no",
    )
    chunk_size: int = _help("positions per LM-head chunk (memory bound)", 1024)
    seed: int = 0
    eval_prompts: str = _help("prompt set with answers for periodic evaluation", "")
    eval_every: int = 0
    eval_limit: int = 0
    verifier: str = _help(
        "auto (addition for the toy's a+b= prompts, else math) | math | last_number | addition", "auto"
    )
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: str = "none"
    resume: str = _help("auto (latest checkpoint in --out) | never | a checkpoint dir", "auto")
    overwrite: bool = False

    # Online training samples from π_θ itself: its ref-KL uses the on-policy estimator (see
    # objective_from_flags).
    on_policy: ClassVar[bool] = False

    def __post_init__(self):
        check(self.steps > 0, f"steps must be positive, got {self.steps}")
        check(self.micro_batch_size > 0, f"micro_batch_size must be positive, got {self.micro_batch_size}")
        check(
            self.max_tokens_per_micro_batch >= 0,
            f"max_tokens_per_micro_batch must be >= 0 (0 = off), got {self.max_tokens_per_micro_batch}",
        )
        check(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            f"attn_implementation must be one of {' | '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}",
        )
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(
            0 <= self.trust_region < 1, f"trust_region must be in [0, 1) (0 = off), got {self.trust_region}"
        )
        check(
            not (self.trust_region and self.clip_eps),
            f"--trust-region {self.trust_region} and --clip-eps {self.clip_eps} are two clips of one ratio; "
            "pass --trust-region 0 to clip against the start-of-step student instead",
        )
        check(
            self.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision: got {self.mixed_precision!r}"
        )
        check_verifier(self.verifier)
        check_report_to(self.report_to)
        check(self.ref_kl_coef >= 0, f"ref_kl_coef must be >= 0, got {self.ref_kl_coef}")
        check(self.gold_nll_coef >= 0, f"gold_nll_coef must be >= 0, got {self.gold_nll_coef}")
        self.check_scale_flags()

    def build_objective(self) -> Objective:
        return objective_from_flags(self, on_policy_ref_kl=self.on_policy)

    def horizon_config(self) -> HorizonConfig:
        return horizon_from_flags(self)

    def run_id(self) -> str:
        """Identifies a run across resumes: a hash of the fields that are not at their defaults, apart
        from RESUMABLE_FIELDS (so adding a field with a default changes no run's id)."""
        defaults = field_defaults(type(self))
        identity = {
            k: v
            for k, v in to_dict(self).items()
            if k not in RESUMABLE_FIELDS and (k not in defaults or v != defaults[k])
        }
        return _short_hash(identity)

    def legacy_run_id(self, saved_fields) -> str:
        """The id that checkpoints written before ``run_id`` ignored defaults carry: a hash of every field
        the run's saved config held (``saved_fields``), apart from RESUMABLE_FIELDS."""
        return _short_hash(
            {k: v for k, v in to_dict(self).items() if k in saved_fields and k not in RESUMABLE_FIELDS}
        )


def _short_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def objective_options() -> dict[str, set[str]]:
    """Every option of every objective class, by objective name (the test's checklist)."""
    return {name: {f.name for f in dataclasses.fields(cls)} for name, cls in OBJECTIVES.items()}
