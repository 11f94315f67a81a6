"""Prompt sets, provenance, model loading checks, SFT loss masking, output-directory safety."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd.config import prepare_output_dir
from lightning_opd.errors import InputError, OutputExistsError, TokenizerMismatchError
from lightning_opd.models.loading import check_same_tokenizer, load_causal_lm, model_identity
from lightning_opd.models.provenance import Provenance, read_provenance, write_provenance
from lightning_opd.prompts import PromptRecord, encode_prompt, load_prompts, prompt_set_hash, write_jsonl
from lightning_opd.stage0.sft import IGNORE_INDEX, SFTExample, collate_sft, response_nll

ROWS = [
    {"prompt_id": "a", "prompt": "1+2=", "answer": "3"},
    {"prompt_id": "b", "prompt": "4+5=", "answer": "9"},
]


def test_prompt_formats_load_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    write_jsonl(ROWS, tmp_path / "p.jsonl")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "p_hf"))
    loaded = [load_prompts(tmp_path / name) for name in ("p.jsonl", "p.parquet", "p_hf")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][0] == PromptRecord(prompt_id="a", prompt="1+2=", answer="3")
    assert prompt_set_hash(loaded[0]) == prompt_set_hash(loaded[2])
    assert prompt_set_hash(loaded[0][:1]) != prompt_set_hash(loaded[0])


def test_prompt_set_bad_input(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="is empty"):
        load_prompts(tmp_path / "empty.jsonl")
    write_jsonl([{"question": "1+1="}], tmp_path / "nofield.jsonl")
    with pytest.raises(InputError, match="missing text field 'prompt'.*--prompt-field"):
        load_prompts(tmp_path / "nofield.jsonl")
    assert load_prompts(tmp_path / "nofield.jsonl", prompt_field="question")[0].prompt_id == "row-0"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{not json\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_prompts(tmp_path / "bad.jsonl")
    write_jsonl(
        [{"prompt_id": "x", "prompt": "a"}, {"prompt_id": "x", "prompt": "b"}], tmp_path / "dup.jsonl"
    )
    with pytest.raises(InputError, match="duplicate"):
        load_prompts(tmp_path / "dup.jsonl")
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("prompt\n1\n")
    with pytest.raises(InputError, match="must be .jsonl"):
        load_prompts(tmp_path / "p.csv")


def test_chat_template_applied_when_present(char_tokenizer):
    plain = encode_prompt(char_tokenizer, "1+2=")
    assert char_tokenizer.decode(plain) == "1+2="
    from lightning_opd.toy.tokenizer import build_char_tokenizer

    chat = build_char_tokenizer()
    chat.chat_template = "U:{{ messages[0]['content'] }}{% if add_generation_prompt %}A:{% endif %}"
    assert chat.decode(encode_prompt(chat, "1+2=")) == "U:1+2=A:"
    assert chat.decode(encode_prompt(chat, "1+2=", chat_template="never")) == "1+2="


def test_sft_loss_masks_prompt_and_padding(micro_student_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    examples = [SFTExample([5, 6, 7], [8, 9, 2]), SFTExample([5], [10, 2])]
    batch = collate_sft(examples, pad_id=0)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [8, 9, 2]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 10, 2] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    # Naive reference: the NLL of exactly the response tokens, each predicted from its prefix.
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.float()
    logp = torch.log_softmax(logits, -1)
    terms = [logp[0, 2, 8], logp[0, 3, 9], logp[0, 4, 2], logp[1, 0, 10], logp[1, 1, 2]]
    expected = -torch.stack(terms).mean()
    assert torch.allclose(response_nll(model, batch), expected, atol=1e-5)
    # Changing a prompt token's *label* position must not change the loss; changing a response token must.
    batch2 = {k: v.clone() for k, v in batch.items()}
    batch2["labels"][0, 1] = IGNORE_INDEX
    assert torch.allclose(response_nll(model, batch2), response_nll(model, batch))


def test_sft_loss_runs_through_the_chunked_kernels_with_the_naive_gradient(micro_student_dir):
    """Stage zero's loss never builds [batch, seq, vocab] logits; value and gradient match the naive
    full-logits cross-entropy whatever the chunk size."""
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    examples = [SFTExample([5, 6, 7], [8, 9, 2]), SFTExample([5], [10, 11, 12, 2]), SFTExample([4, 4], [2])]
    batch = collate_sft(examples, pad_id=0)

    def naive(m):
        logits = (
            m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        )
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )

    def value_and_grad(loss_fn):
        model.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    expected, expected_grad = value_and_grad(naive)
    for chunk_size in (1, 3, 1024):
        got, grad = value_and_grad(lambda m, c=chunk_size: response_nll(m, batch, chunk_size=c))
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_provenance_round_trip(micro_student_dir, tmp_path):
    ident = model_identity(micro_student_dir)
    prov = Provenance(
        stage="sft",
        model_fingerprint="fp1:x",
        tokenizer_fingerprint="tok1:y",
        sft_teacher=ident.__dict__,
        config={"lr": 1e-3},
    )
    write_provenance(tmp_path, prov)
    back = read_provenance(tmp_path)
    assert back.sft_teacher_identity == ident
    assert back.config == {"lr": 1e-3} and back.stage == "sft"
    assert read_provenance(tmp_path / "nothing") is None
    (tmp_path / "lopd_provenance.json").write_text("{broken")
    with pytest.raises(InputError, match="not a valid provenance"):
        read_provenance(tmp_path)


def test_model_dir_checks(tmp_path, micro_student_dir):
    with pytest.raises(InputError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    )
    with pytest.raises(InputError, match="not a causal language model"):
        load_causal_lm(tmp_path / "bert")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((micro_student_dir / "config.json").read_text())
    with pytest.raises(InputError, match="no \\*.safetensors"):
        model_identity(tmp_path / "noweights")


def test_tokenizer_that_does_not_belong_to_the_model(micro_student_dir, tmp_path):
    from lightning_opd.toy.tokenizer import build_char_tokenizer

    big = build_char_tokenizer()
    big.add_tokens([f"<extra{i}>" for i in range(50)])
    big.save_pretrained(tmp_path / "tok")
    with pytest.raises(TokenizerMismatchError, match="does not belong to the model"):
        load_causal_lm(micro_student_dir, tokenizer_path=tmp_path / "tok")
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    model.save_pretrained(tmp_path / "other")
    big.save_pretrained(tmp_path / "other")
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        check_same_tokenizer(model_identity(micro_student_dir), model_identity(tmp_path / "other"), "test")


def test_output_dir_holding_another_run_is_refused(tmp_path):
    from pipelines.evaluate import EvalJobConfig

    a = EvalJobConfig(model="m", prompts="p")
    prepare_output_dir(tmp_path / "run", a)
    prepare_output_dir(tmp_path / "run", a)  # the same run again: a resume, accepted
    with pytest.raises(OutputExistsError, match="differs in \\['seed'\\]"):
        prepare_output_dir(tmp_path / "run", EvalJobConfig(model="m", prompts="p", seed=1))
    (tmp_path / "run" / "keep.txt").write_text("precious")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.bin").write_text("x")
    with pytest.raises(OutputExistsError, match="holds no config.json"):
        prepare_output_dir(tmp_path / "foreign", a)
    assert (tmp_path / "foreign" / "data.bin").read_text() == "x"


def test_bos_without_a_chat_template_follows_the_tokenizer_and_never_an_eos():
    """Issue 22: without a template a prompt gets BOS exactly when the tokenizer adds one by itself
    (Gemma, Llama), once, and no EOS even from a tokenizer that appends one by default."""
    from lightning_opd.toy.tokenizer import build_char_tokenizer

    plain = build_char_tokenizer()  # adds nothing by default: nothing added (the toy's stores unchanged)
    assert encode_prompt(plain, "1+2=") == plain("1+2=", add_special_tokens=False)["input_ids"]
    with_bos = build_char_tokenizer()
    with_bos.add_bos_token = True
    with_bos.add_eos_token = True
    with_bos.update_post_processor()
    assert with_bos("1+2=")["input_ids"][-1] == with_bos.eos_token_id  # this tokenizer appends EOS
    ids = encode_prompt(with_bos, "1+2=")
    assert ids == [with_bos.bos_token_id, *plain("1+2=", add_special_tokens=False)["input_ids"]]
    assert encode_prompt(with_bos, "1+2=", chat_template="never") == ids
