"""Model and tokenizer fingerprints: stable across save/load and dtype moves, sensitive to changes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd.errors import InputError
from lightning_opd.models.fingerprint import FULL_HASH_ELEMENTS, model_fingerprint, tokenizer_fingerprint
from lightning_opd.toy.models import MICRO_SPEC, ToyModelSpec, build_model
from lightning_opd.toy.tokenizer import build_char_tokenizer


def save(model, path):
    model.save_pretrained(path)
    return path


def test_stable_across_save_load_and_dtype(micro_student_dir, tmp_path):
    base = model_fingerprint(micro_student_dir)
    assert base == model_fingerprint(micro_student_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    assert model_fingerprint(save(model, tmp_path / "resaved")) == base
    assert model_fingerprint(save(model.to(torch.bfloat16), tmp_path / "bf16")) == base
    assert model_fingerprint(save(model.to(torch.float32), tmp_path / "back")) == base
    # Sharding the checkpoint differently does not change the weights either.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert model_fingerprint(tmp_path / "sharded") == base


def test_bin_checkpoint_matches_safetensors(micro_student_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    (tmp_path / "bin").mkdir()
    state = {
        k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied, as safetensors saves it
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert model_fingerprint(tmp_path / "bin") == model_fingerprint(micro_student_dir)


def test_changes_when_any_weight_changes(micro_student_dir, tmp_path):
    base = model_fingerprint(micro_student_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    for name, param in model.named_parameters():
        with torch.no_grad():
            param.view(-1)[-1] += 0.5
        assert model_fingerprint(save(model, tmp_path / name)) != base, name
        with torch.no_grad():
            param.view(-1)[-1] -= 0.5
    other = build_model(MICRO_SPEC, build_char_tokenizer(), seed=99)
    assert model_fingerprint(save(other, tmp_path / "other")) != base


def test_large_tensors_are_sampled_not_read_whole(tmp_path):
    # A tensor above FULL_HASH_ELEMENTS is sampled; a change over its whole range is still seen.
    spec = ToyModelSpec(layers=1, hidden=1024, heads=2, intermediate=FULL_HASH_ELEMENTS // 1024 + 64)
    model = build_model(spec, build_char_tokenizer())
    base = model_fingerprint(save(model, tmp_path / "a"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    assert model_fingerprint(save(model, tmp_path / "b")) != base


def test_not_a_model_dir(tmp_path):
    with pytest.raises(InputError, match="no \\*.safetensors"):
        model_fingerprint(tmp_path)


def test_tokenizer_fingerprint(char_tokenizer, micro_student_dir):
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(micro_student_dir)) == tokenizer_fingerprint(
        char_tokenizer
    )
    other = build_char_tokenizer()
    other.add_tokens(["<think>"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(char_tokenizer)
    templated = build_char_tokenizer()
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(templated) != tokenizer_fingerprint(char_tokenizer)
