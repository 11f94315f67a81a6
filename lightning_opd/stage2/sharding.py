"""Stage two's distributed modes, all through accelerate: one process, DDP, or FSDP2.

    accelerate launch --multi_gpu --num_processes 8 -m lightning_opd.cli train ...        # DDP
    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m lightning_opd.cli train ...

FSDP2 shards parameters, gradients and optimizer state over the processes: one FSDP unit per decoder
layer, the ``StudentScorer`` as the root unit. The root keeps the embedding, the final norm and the LM
head, gathered whole for the forward, which is what the chunked head needs. Three choices of ours:

- **Precision.** Parameters stay fp32 in the all-gather (``param_dtype=None``) and gradients are
  reduced in fp32; ``--mixed-precision bf16`` runs the matmuls in bf16 under autocast. accelerate's
  default (bf16 parameters and bf16 reduction) would round the head's logits to bf16 before the
  log-softmax (0.1-0.19 nats at a 152k vocabulary) and sum gradients in bf16. The price: all-gathers
  move fp32, twice the bytes of bf16.
- **CPU.** accelerate selects FSDP only on accelerator devices; under ``ACCELERATE_USE_CPU=1`` it
  silently falls back to DDP over gloo. Sharding works over gloo all the same (that is how the tests
  run FSDP2 with two processes on a laptop), so an FSDP2 launch on CPU is promoted to FSDP2 rather
  than quietly becoming something else.
- **Refused:** FSDP1 and DeepSpeed (DeepSpeed steps its engine inside every ``backward``, which breaks
  the micro-batch accumulation of one update per step), Megatron-LM. Each with the FSDP2 command.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from lightning_opd.errors import ConfigError

FSDP2_HOW = (
    "use FSDP2: `accelerate launch --config_file examples/accelerate/fsdp2.yaml -m lightning_opd.cli "
    "train ...` (fsdp_version: 2), or DDP with `accelerate launch --multi_gpu`"
)


def training_accelerator(mixed_precision: str, **kwargs) -> Accelerator:
    """The ``Accelerator`` of stage two, FSDP2 set up as described above; refuses unsupported modes."""
    accelerator = Accelerator(mixed_precision=mixed_precision, **kwargs)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        _promote_to_fsdp(accelerator)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    check_distributed(accelerator.distributed_type, getattr(plugin, "fsdp_version", None))
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    return accelerator


def check_distributed(distributed_type: DistributedType, fsdp_version: int | None = None) -> None:
    """Refuse the distributed modes stage two is not built for, before anything is loaded or written."""
    if distributed_type == DistributedType.FSDP and fsdp_version == 2:
        return
    names = {
        DistributedType.FSDP: "FSDP1 (fsdp_version: 1)",
        DistributedType.DEEPSPEED: "DeepSpeed",
        DistributedType.MEGATRON_LM: "Megatron-LM",
    }
    if distributed_type in names:
        raise ConfigError(f"lopd train does not support {names[distributed_type]}; {FSDP2_HOW}")


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # set by accelerate launch


def _promote_to_fsdp(accelerator: Accelerator) -> None:
    """FSDP on a CPU launch (see the module docstring), from the launcher's own FSDP settings."""
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch sets
    if plugin.fsdp_version != 2:
        check_distributed(DistributedType.FSDP, plugin.fsdp_version)
    # accelerate keeps the distributed type in two process-wide states; AcceleratorState re-reads
    # PartialState's whenever it is constructed, so both must say FSDP.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
