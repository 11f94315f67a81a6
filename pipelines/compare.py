"""The method family side by side: one SFT student, one store, every method as a configuration.

    lopd compare --student runs/demo/sft --teacher TEACHER --prompts runs/demo/prompts/opd.jsonl \\
        --eval-prompts runs/demo/prompts/eval.jsonl --store runs/demo/store-top20 --out runs/compare
    lopd compare ... --methods lightning,topd-10,online     # a subset
    lopd compare ... --micro                                 # tiny sizes, for tests (numbers meaningless)
    lopd compare --toy --seeds 3 --out runs/compare --readme docs/RESULTS.md   # the findings with seeds

With ``--seeds N`` every method runs under seeds seed..seed+N-1 and the table reports mean ± 95% CI
and the papers' findings as paired per-seed differences (``lightning_opd.reporting.findings``); with ``--toy``
each seed also rebuilds the embedded toy (prompts, SFT student, store) the way ``lopd demo`` does, so
the spread covers the whole pipeline. ``--readme`` regenerates the findings table of docs/RESULTS.md.

Without ``--store`` stage one runs first (rollouts + teacher top-k scoring, timed). Each method
trains from the same SFT student (offline methods on the same store, online methods sampling
themselves), is evaluated greedily on ``--eval-prompts``, and lands in ``results.csv``; ``results.png``
plots accuracy against wall-clock. An offline method's total time includes stage one (the store is
shared: what TOPD/ESR would save by *generating* shorter rollouts is not credited, see METHODS §3).
A finished method is skipped on a rerun with the same settings (``--overwrite`` reruns all).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from lightning_opd.config import check, prepare_output_dir
from lightning_opd.prompts import load_prompts
from lightning_opd.reporting.findings import (
    findings_markdown,
    method_grid,
    methods_markdown,
    replace_between_markers,
)
from lightning_opd.reporting.tables import (
    format_compare_table,
    plot_compare,
    stage_one_seconds_from_files,
    write_csv,
)
from lightning_opd.store import open_store
from pipelines import demo
from pipelines.compare_runs import build_store, run_one, score_with_other_teacher
from pipelines.demo import DemoConfig


@dataclass
class CompareConfig:
    out: str = field(metadata={"help": "output directory"})
    student: str = field(
        default="", metadata={"help": "the SFT student every method starts from (the store's sampler)"}
    )
    teacher: str = field(default="", metadata={"help": "its SFT teacher (online methods; stage one)"})
    other_teacher: str = field(
        default="",
        metadata={
            "help": "method `inconsistent`: a teacher that did not write the SFT data, ideally with another "
            "answer style (--toy trains one that writes each column's sum first)"
        },
    )
    prompts: str = field(
        default="", metadata={"help": "OPD prompt set with solutions (online prompts, gold mixture)"}
    )
    eval_prompts: str = field(default="", metadata={"help": "held-out prompt set with answers"})
    toy: bool = field(
        default=False,
        metadata={"help": "build the embedded toy per seed as `lopd demo` does (no --student etc.)"},
    )
    seeds: int = field(default=1, metadata={"help": "seeds per method: mean ± 95% CI over them"})
    cache_dir: str = field(default="", metadata={"help": "--toy: toy teacher cache (as lopd demo)"})
    readme: str = field(default="", metadata={"help": "regenerate this file's findings table"})
    store: str = field(default="", metadata={"help": "scored store (default: run stage one into OUT/store)"})
    methods: str = field(default="all", metadata={"help": "comma-separated method names, or all"})
    steps: int = 100
    batch_size: int = field(default=64, metadata={"help": "rollouts per step, offline and online"})
    online_n: int = field(default=4, metadata={"help": "online samples per prompt"})
    lr: float = 3e-5
    warmup_steps: int = 10
    sample_reduction: str = "mean"
    esr_tokens: int = field(default=0, metadata={"help": "ESR's N (default: min(100, T/4) of the store's T)"})
    topk: int = field(default=20, metadata={"help": "teacher top-k when stage one runs here"})
    max_new_tokens: int = field(default=48, metadata={"help": "horizon T when stage one runs here"})
    temperature: float = field(
        default=-1.0,
        metadata={
            "help": "sampling temperature of stage one and of the online methods (< 0: their own defaults, "
            "0.7 and 1.0); a long horizon with a high temperature is where rollouts can inflate (StableOPD)"
        },
    )
    stage_one_seconds: float = field(
        default=-1.0, metadata={"help": "stage-one time of --store (-1: from the store's file times)"}
    )
    eval_limit: int = 0
    seed: int = 0
    micro: bool = field(default=False, metadata={"help": "tiny sizes for tests"})
    overwrite: bool = False

    def __post_init__(self):
        check(self.steps > 0, f"steps must be positive, got {self.steps}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(self.online_n > 0, f"online_n must be positive, got {self.online_n}")
        check(self.esr_tokens >= 0, f"esr_tokens must be >= 0, got {self.esr_tokens}")
        check(self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}")
        if not self.toy:
            missing = [n for n in ("student", "teacher", "prompts", "eval_prompts") if not getattr(self, n)]
            check(not missing, f"pass --{' --'.join(m.replace('_', '-') for m in missing)}, or --toy")
        check(
            not (self.toy and self.store),
            "--toy builds a store per seed; drop --store (or drop --toy and pass --student etc.)",
        )
        check(
            self.toy or self.other_teacher or "inconsistent" not in self.method_names(),
            "method `inconsistent` needs --other-teacher (a teacher other than the student's SFT teacher)",
        )
        if self.micro:
            self.steps, self.batch_size, self.online_n = 2, 4, 2
            self.eval_limit, self.max_new_tokens, self.topk = self.eval_limit or 4, 8, 3
        unknown = sorted(set(self.method_names()) - set(METHODS))
        check(not unknown, f"unknown methods {unknown}; choose among {list(METHODS)}")

    def method_names(self) -> list[str]:
        if self.methods != "all":
            return [m for m in self.methods.split(",") if m]
        # `all` includes the teacher-consistency control only where there is a second teacher
        return [m for m in METHODS if m != "inconsistent" or self.toy or self.other_teacher]


METHODS = tuple(method_grid(48, 40, "", 0))


def run(config: CompareConfig, log=print) -> list[dict]:
    out = prepare_output_dir(config.out, config, overwrite=True)
    results = []
    for seed in range(config.seed, config.seed + config.seeds):
        seed_out = out if config.seeds == 1 else out / f"seed-{seed}"
        inputs = toy_inputs(config, seed_out, seed, log) if config.toy else {}
        seed_config = replace(config, seed=seed, toy=False, **inputs)
        results += [{**r, "seed": seed} for r in run_seed(seed_config, seed_out, log)]
        write_csv(out / "results.csv", results)
    plot_compare(results, out / "results.png")
    log(format_compare_table(results))
    if config.seeds > 1:
        report = "\n\n".join([findings_markdown(results), methods_markdown(results)])
        (out / "findings.md").write_text(report + "\n")
        log(report)
        if config.readme:
            replace_between_markers(Path(config.readme), report)
            log(f"compare: regenerated the findings table in {config.readme}")
    return results


def toy_inputs(config: CompareConfig, out: Path, seed: int, log) -> dict:
    """The embedded toy for one seed, built (or reused) like `lopd demo`: student, teacher, prompts, store."""
    sizes = dict(sft_prompts=16, sft_holdout=4, opd_prompts=12, eval_prompts=8, sft_steps=2, teacher_steps=3)
    demo_config = DemoConfig(
        workdir=str(out),
        cache_dir=config.cache_dir,
        micro=config.micro,
        horizon=config.max_new_tokens,
        topk=config.topk,
        backend="transformers",
        **({"temperature": config.temperature} if config.temperature >= 0 else {}),
        **(sizes if config.micro else {}),
    )
    out.mkdir(parents=True, exist_ok=True)
    prompts = demo.toy_prompts(demo_config, out, seed)
    teacher = demo.toy_teacher(demo_config, log)
    student = demo.stage_zero(demo_config, teacher, out, prompts, seed, log)
    store = demo.stage_one(demo_config, teacher, student, out, prompts, seed, log)
    other = {}
    if "inconsistent" in config.method_names():
        other["other_teacher"] = str(demo.toy_teacher(demo_config, log, style="sum_first"))
    return {
        **other,
        "student": str(student),
        "teacher": str(teacher),
        "prompts": str(prompts["opd"]),
        "eval_prompts": str(prompts["eval"]),
        "store": str(store),
        "stage_one_seconds": -1.0,
    }


def run_seed(config: CompareConfig, out: Path, log) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    if config.store:
        store = Path(config.store)
        stage_one = (
            config.stage_one_seconds if config.stage_one_seconds >= 0 else stage_one_seconds_from_files(store)
        )
        if stage_one is None:
            warnings.warn(
                f"stage-one time of {store} is unknown (not written by `lopd precompute`, or copied); "
                "pass --stage-one-seconds; offline totals count training only",
                stacklevel=1,
            )
    else:
        store, stage_one = build_store(config, out, log)
    manifest = open_store(store).manifest
    horizon, has_topk = int(manifest.horizon), manifest.topk_k is not None
    records = load_prompts(config.eval_prompts, limit=config.eval_limit or None)
    grid = method_grid(horizon, config.steps, config.prompts, config.esr_tokens)
    known = "unknown" if stage_one is None else f"{stage_one:.0f} s"
    log(f"compare: {len(config.method_names())} methods on {store} (T={horizon}), stage one {known}")
    inconsistent = "inconsistent" in config.method_names()
    other_store = score_with_other_teacher(config, store, out, log) if inconsistent else None
    results = []
    for name in config.method_names():
        kind, overrides = grid[name]
        method_store = other_store if kind == "inconsistent" else store
        results.append(
            run_one(
                name, kind, overrides, config, method_store, horizon, has_topk, stage_one, records, out, log
            )
        )
    return results


__all__ = ["CompareConfig", "method_grid", "run", "stage_one_seconds_from_files"]
