"""Tiny Qwen2-style causal LMs for the toy task, built from a config (no hub is reachable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM


@dataclass(frozen=True)
class ToyModelSpec:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_positions: int = 128

    def describe(self) -> str:
        return f"{self.layers}L-{self.hidden}H"


TEACHER_SPEC = ToyModelSpec(layers=4, hidden=256, heads=4, intermediate=768)
STUDENT_SPEC = ToyModelSpec(layers=2, hidden=128, heads=2, intermediate=384)
MICRO_SPEC = ToyModelSpec(layers=1, hidden=32, heads=2, intermediate=64)  # tests only


def build_model(spec: ToyModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
