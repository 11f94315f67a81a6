"""Model and tokenizer fingerprints: the identities that teacher consistency is checked with.

Model fingerprint (``model_fingerprint(dir)``)
    Computed from the checkpoint files (safetensors, or ``pytorch_model*.bin``) without loading the
    model. Each tensor contributes its name, shape and a hash of its *values* rounded to bfloat16:
    every element when the tensor has at most ``FULL_HASH_ELEMENTS`` elements, otherwise
    ``SAMPLED_ELEMENTS`` positions drawn from a generator seeded by the tensor's name. Why this way:

    - values, not file bytes, so the same weights saved as fp32 or bf16, sharded differently, or
      moved between devices before saving, give the same fingerprint;
    - bfloat16 rounding because it is the coarsest dtype models are moved to; fp32 -> bf16 is
      exact-deterministic. (A model cast to fp16 and back may differ in rare ties: not the same weights.)
    - sampling large tensors keeps the cost at a few MB of reads through a memory map even for a
      70 GB checkpoint (a few seconds, dominated by page faults), instead of hashing 70 GB. Training
      changes every weight, so a sample sees it; a hand edit of one element in a large tensor may go
      unseen, which is why small tensors (norms, biases, toy models) are hashed whole.

Tokenizer fingerprint (``tokenizer_fingerprint(tok)``)
    A hash of the token->id map, the special tokens and the chat template: two tokenizers that agree
    on it encode and decode every string identically for our purposes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from lightning_opd.errors import InputError

FINGERPRINT_VERSION = "fp1"
FULL_HASH_ELEMENTS = 1 << 20
SAMPLED_ELEMENTS = 1 << 14

_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # raw bfloat16 bits
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _bf16_bits(values: np.ndarray, safetensors_dtype: str) -> np.ndarray:
    """Round values to bfloat16 (nearest-even) and return the 16-bit patterns."""
    if safetensors_dtype == "BF16":
        return values.astype(np.uint16, copy=False)
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _sample_positions(name: str, numel: int) -> np.ndarray | None:
    if numel <= FULL_HASH_ELEMENTS:
        return None
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    positions = np.random.default_rng(seed).choice(numel, size=SAMPLED_ELEMENTS, replace=False)
    positions.sort()  # sequential page access through the memory map
    return positions


def _tensor_digest(name: str, shape: tuple[int, ...], flat: np.ndarray, safetensors_dtype: str) -> str:
    positions = _sample_positions(name, flat.size)
    values = flat if positions is None else flat[positions]
    if safetensors_dtype in ("F32", "F16", "BF16", "F64"):
        payload = _bf16_bits(np.asarray(values), safetensors_dtype).tobytes()
    else:
        payload = np.asarray(values).astype(np.int64).tobytes()
    h = hashlib.sha256()
    h.update(json.dumps([name, list(shape)]).encode())
    h.update(payload)
    return h.hexdigest()


def _iter_safetensors(path: Path):
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise InputError(
                f"{path}: tensor {name} has dtype {dtype}, which fingerprinting does not support"
            )
        start, end = info["data_offsets"]
        flat = data[start:end].view(_SAFETENSORS_DTYPES[dtype])
        yield name, tuple(info["shape"]), flat, dtype


def _iter_torch_bin(path: Path):
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for name, tensor in state.items():
        t = tensor.detach()
        if t.dtype == torch.bfloat16:
            flat, dtype = t.reshape(-1).view(torch.uint16).numpy(), "BF16"
        elif t.is_floating_point():
            flat, dtype = t.reshape(-1).float().numpy(), "F32"
        else:
            flat, dtype = t.reshape(-1).numpy(), "I64"
        yield name, tuple(t.shape), flat, dtype


def weight_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise InputError(
            f"{model_dir} holds no *.safetensors or pytorch_model*.bin weights; is it a saved model directory?"
        )
    return files


def model_fingerprint(model_dir: str | Path) -> str:
    """A stable identity of the weights in ``model_dir`` (see the module docstring)."""
    digests: dict[str, str] = {}
    for path in weight_files(model_dir):
        reader = _iter_safetensors if path.suffix == ".safetensors" else _iter_torch_bin
        for name, shape, flat, dtype in reader(path):
            digests[name] = _tensor_digest(name, shape, flat, dtype)
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name in sorted(digests):
        h.update(f"{name}:{digests[name]};".encode())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:32]}"


def tokenizer_fingerprint(tokenizer) -> str:
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps(
        {
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
            "special": special,
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        sort_keys=True,
    )
    return "tok1:" + hashlib.sha256(payload.encode()).hexdigest()[:32]
