"""What fits: the estimated peak memory per GPU of each way to run stage two on a student.

    lopd plan --model runs/sft --sequence-length 4096 --gpus 1 --gpu-memory-gib 80
    lopd plan --model examples/configs/qwen3-8b.json --sequence-length 16384 --gpus 8   # a bare config.json

Reads only the config (the architecture is built on the meta device; one decoder layer runs on the
CPU to measure its activations: lightning_opd/plan.py). Prints every choice (full / LoRA, DDP /
FSDP2, gradient checkpointing off / on, tokens per micro-batch), whether it fits, and the command
of the cheapest one that does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lightning_opd.config import check, check_writable_file, parse_number_list, write_json_atomic
from lightning_opd.plan import GIB, architecture_shapes, load_model_config, plan_table, resident_model_bytes


@dataclass
class PlanConfig:
    model: str = field(
        metadata={"help": "student model directory, or a bare config.json (no weights needed)"}
    )
    sequence_length: int = field(
        default=4096, metadata={"help": "tokens per sequence (prompt + response: the store's longest)"}
    )
    micro_batch_sizes: str = field(
        default="1,2,4", metadata={"help": "--micro-batch-size values to plan for"}
    )
    gpus: int = field(default=1, metadata={"help": "GPUs (processes) stage two runs on"})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "memory of one GPU in GiB"})
    lora_rank: int = field(default=16, metadata={"help": "the LoRA rank the LoRA rows plan for"})
    precision: str = field(
        default="bf16", metadata={"help": "bf16 | no (the --mixed-precision of lopd train)"}
    )
    teacher: str = field(
        default="",
        metadata={"help": "online baseline (lopd train-online): the teacher's directory or config.json; "
                  "its weights sit on the same GPU"},
    )  # fmt: skip
    reference_copy: bool = field(
        default=False,
        metadata={"help": "online with --ref-kl-coef > 0: a frozen fp32 copy of the student as pi_ref"},
    )
    out: str = field(default="", metadata={"help": "JSON file for the plan (default: none)"})

    def __post_init__(self):
        check(self.gpus >= 1, f"gpus must be >= 1, got {self.gpus}")
        check(self.gpu_memory_gib > 0, f"gpu_memory_gib must be positive, got {self.gpu_memory_gib}")
        check(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        check(self.precision in ("bf16", "no"), f"precision must be bf16 or no, got {self.precision!r}")
        check(self.sequence_length >= 1, f"sequence_length must be >= 1, got {self.sequence_length}")
        self.token_counts()  # a ConfigError naming --micro-batch-sizes when malformed
        check(
            not (self.teacher or self.reference_copy) or self.gpus == 1,
            "--teacher / --reference-copy plan the online baseline, which runs in one process: pass --gpus 1",
        )
        if self.out:
            check_writable_file(self.out, "--out")

    def token_counts(self) -> list[int]:
        """Tokens per micro-batch per GPU, one per --micro-batch-sizes value."""
        sizes = parse_number_list(self.micro_batch_sizes, int, "--micro-batch-sizes", minimum=1)
        return [self.sequence_length * m for m in sizes]


def _label(choice, gpus: int) -> str:
    kind = f"LoRA r{choice.lora_rank}" if choice.lora_rank else "full"
    mode = "FSDP2" if choice.fsdp2 else ("DDP" if gpus > 1 else "1 GPU")
    return f"{kind:9s} {mode:5s} ckpt {'on' if choice.checkpointing else 'off'}"


def run(config: PlanConfig, log=print) -> list[dict]:
    shapes = architecture_shapes(load_model_config(config.model), config.precision)
    resident = {}
    if config.teacher:
        resident["teacher"] = resident_model_bytes(load_model_config(config.teacher))
    if config.reference_copy:
        resident["reference_copy"] = 4 * shapes.params
    rows = plan_table(
        shapes,
        gpus=config.gpus,
        gpu_memory_gib=config.gpu_memory_gib,
        tokens=config.token_counts(),
        lora_rank=config.lora_rank,
        resident=resident,
    )
    log(
        f"{shapes.name}: {shapes.params / 1e9:.2f}B parameters, {shapes.layers} layers, vocab {shapes.vocab}; "
        f"activations {shapes.act_bytes_per_token / 1024:.0f} KiB/token/layer "
        f"({shapes.ckpt_bytes_per_token / 1024:.0f} with checkpointing), precision {shapes.precision}"
    )
    for name, size in resident.items():
        log(
            f"online baseline: the {name.replace('_', ' ')} sits on the same GPU: {size / GIB:.1f} GiB in every row"
        )
    log(f"{config.gpus} GPU(s) x {config.gpu_memory_gib:g} GiB; estimated peak per GPU:")
    log(f"  {'choice':28s} {'micro-batch':>11s} {'tokens':>7s} {'GiB':>8s}  fits")
    for row in sorted(rows, key=lambda r: r["peak_gib"]):
        c = row["choice"]
        micro = c.tokens // config.sequence_length
        fits = "yes" if row["fits"] else "no"
        log(f"  {_label(c, config.gpus):28s} {micro:11d} {c.tokens:7d} {row['peak_gib']:8.1f}  {fits}")
    best = rows[0] if rows[0]["fits"] else None
    if best is None:
        log("nothing fits: more GPUs (FSDP2), fewer tokens per micro-batch, or a smaller student")
    else:
        micro = best["choice"].tokens // config.sequence_length
        command = "train-online" if config.teacher else "train"
        log(
            f"cheapest that fits ({best['peak_gib']:.1f} GiB): {best['choice'].flags(config.gpus, micro, command)}"
        )
    if config.out:
        write_json_atomic(
            config.out,
            {
                "config": asdict(config),
                "shapes": shapes.__dict__,
                "rows": [
                    {
                        **asdict(r["choice"]),
                        "peak_gib": r["peak_gib"],
                        "fits": r["fits"],
                        "parts_gib": {k: v / GIB for k, v in r["parts"].items()},
                    }
                    for r in rows
                ],  # fmt: skip
            },
        )
    return rows
