"""Choosing a rollout backend: ``make_sampler`` gives a vLLM or a transformers sampler for a model
directory (or an already loaded model). Apart from ``rollout`` (the transformers sampler and the
conventions both follow) and ``vllm_backend`` (which builds on ``rollout``), so neither imports the
other's factory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from lightning_opd.errors import ConfigError
from lightning_opd.models.loading import load_causal_lm
from lightning_opd.progress import shown
from lightning_opd.stage1.rollout import Sampler, SamplingConfig, TransformersSampler


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, model_is_directory: bool) -> str:
    """ "auto" means vLLM when it is installed and we were given a directory it can load."""
    if backend == "auto":
        return "vllm" if vllm_available() and model_is_directory else "transformers"
    if backend == "vllm":
        if not vllm_available():
            raise ConfigError(
                "backend 'vllm' asked for but vLLM is not installed; pip install vllm (or run "
                "bash .ci/vllm_env.sh), or use backend 'transformers'"
            )
        if not model_is_directory:
            raise ConfigError(
                "backend 'vllm' loads the model itself: pass the model directory, not a model object"
            )
    return backend


def make_sampler(
    model_dir_or_model: str | Path | Any,
    config: SamplingConfig,
    device: str = "auto",
    *,
    tokenizer=None,
    engine: Any = None,
    progress: str = "",
) -> Sampler:
    """A sampler for a model directory (or an already loaded transformers model plus ``tokenizer``).

    ``engine`` is a ``lightning_opd.stage1.vllm_backend.VLLMEngineConfig`` for the vLLM backend (vLLM picks
    its own device; ``device`` is for transformers). The vLLM engine starts worker processes: a
    script that uses it needs the ``if __name__ == "__main__":`` guard. ``progress``: a bar's label
    for long generations (eval, SFT's teacher answers); empty = no bar.
    """
    is_dir = isinstance(model_dir_or_model, (str, Path))
    backend = resolve_backend(config.backend, is_dir)
    if backend == "vllm":
        from lightning_opd.stage1.vllm_backend import VLLMSampler  # imports vllm: only when asked for

        return VLLMSampler(model_dir_or_model, config, engine=engine, progress=bool(progress) and shown())
    if is_dir:
        model, loaded_tokenizer = load_causal_lm(model_dir_or_model, dtype=config.dtype, device=device)
        return TransformersSampler(
            model, tokenizer or loaded_tokenizer, config, model.device, progress=progress
        )
    if tokenizer is None:
        raise ConfigError("make_sampler was given a model object without its tokenizer; pass tokenizer=...")
    # "auto" keeps a loaded model where the caller put it.
    return TransformersSampler(
        model_dir_or_model, tokenizer, config, None if device == "auto" else device, progress=progress
    )
