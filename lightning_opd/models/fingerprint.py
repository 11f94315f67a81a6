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

Behaviour fingerprint (``behavior_record(logprobs)``, for a teacher behind a server)
    A served teacher's weights are not at hand, so it is known by what it does: its log-probs on a
    fixed probe (``PROBE_TEXT`` encoded by the teacher's tokenizer without special tokens, the first
    ``PROBE_TOKENS`` ids), each token given the ones before it. The hash is over the values rounded to
    ``BEHAVIOR_DECIMALS`` (2) decimals: fp32 backends (transformers here, vLLM on a server) differ by
    ~1e-6 nats, so a 0.01 grid almost never splits them, while two different checkpoints differ by far
    more than 0.01 somewhere on the probe. A value that lands next to a rounding boundary can still
    flip the hash, so the record also keeps the values (4 decimals) and ``same_behavior`` accepts two
    records whose values are within ``BEHAVIOR_TOLERANCE`` nats everywhere. Computed in float32 from
    local weights (``local_behavior``) exactly as from a server's prompt log-probs.
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


BEHAVIOR_VERSION = "bfp1"
# Digits, operators and an English pangram: every tokenizer we meet encodes these, and the probe
# exercises arithmetic and prose alike. Changing it changes every behaviour fingerprint (bump the version).
PROBE_TEXT = "12+345=357; 7*8=56, 90-4=86. The quick brown fox jumps over the lazy dog."
PROBE_TOKENS = 32  # short enough for any server's context, long enough to tell checkpoints apart
BEHAVIOR_DECIMALS = 2
BEHAVIOR_TOLERANCE = 0.05  # nats, the most any probe value may move between two backends of one model


def probe_ids(tokenizer) -> list[int]:
    """The probe's token ids under ``tokenizer`` (no BOS/EOS: what a template adds is not the model)."""
    ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])[:PROBE_TOKENS]
    if len(ids) < 2:
        raise InputError(
            f"the teacher's tokenizer encodes the fingerprint probe {PROBE_TEXT!r} into {len(ids)} token(s); "
            "a behaviour fingerprint needs at least 2: is --teacher a text tokenizer?"
        )
    return ids


def _rounded(value: float) -> str:
    rounded = round(float(value), BEHAVIOR_DECIMALS)
    # -0.0 == 0: a tiny negative log-prob and a tiny positive rounding error must hash alike.
    return f"{0.0 if rounded == 0 else rounded:.{BEHAVIOR_DECIMALS}f}"


def behavior_fingerprint(logprobs) -> str:
    """The hash of the probe log-probs rounded to ``BEHAVIOR_DECIMALS`` (a -0.00 counts as 0.00)."""
    payload = json.dumps([BEHAVIOR_VERSION, PROBE_TEXT, [_rounded(v) for v in logprobs]])
    return f"{BEHAVIOR_VERSION}:{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


def behavior_record(logprobs) -> dict:
    """What a manifest or provenance file keeps: the fingerprint and the values it was made from."""
    values = [float(v) for v in logprobs]
    return {
        "fingerprint": behavior_fingerprint(values),
        "probe_logprobs": [round(v, 4) for v in values],
        "decimals": BEHAVIOR_DECIMALS,
    }


def behavior_distance(a: dict, b: dict) -> float:
    """The largest difference between two records' probe values (inf when they probed differently)."""
    x, y = a.get("probe_logprobs") or [], b.get("probe_logprobs") or []
    if len(x) != len(y) or not x:
        return float("inf")
    return max(abs(float(u) - float(v)) for u, v in zip(x, y))


def same_behavior(a: dict, b: dict) -> bool:
    """Equal fingerprints, or (a value next to a rounding boundary) values within the tolerance."""
    return a["fingerprint"] == b["fingerprint"] or behavior_distance(a, b) <= BEHAVIOR_TOLERANCE


def local_behavior(model_dir: str | Path, device: str = "cpu") -> dict:
    """The behaviour record of the weights in ``model_dir``: float32, as a server would score the probe."""
    import torch

    from lightning_opd.models.loading import load_causal_lm
    from lightning_opd.scoring import score_sequences  # lazy: modeling imports this module

    model, tokenizer = load_causal_lm(model_dir, dtype="float32", device=device)
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        scored = score_sequences(model, [ids[:1]], [ids[1:]])[0]
    del model
    return behavior_record(scored.logprobs.tolist())


# Stage zero records the SFT teacher's behaviour only up to this much weight on disk (~1B parameters
# in bf16): computing it loads a second, float32 copy of the teacher, which a 32B teacher (128 GB in
# fp32) cannot afford. Above it, stage one computes the record from the SFT teacher's weights when a
# served teacher needs checking (``consistency.sft_teacher_behavior``).
STAGE0_BEHAVIOR_MAX_BYTES = 2 << 30


def weight_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model_dir))


def has_weights(model_dir: str | Path) -> bool:
    try:
        return bool(weight_files(model_dir))
    except InputError:
        return False
