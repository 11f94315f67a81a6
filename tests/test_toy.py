"""The embedded toy task: tokenizer round-trip, generator, verifier, disjoint splits."""

import pytest
from transformers import AutoTokenizer

from lightning_opd.toy.task import (
    SPLITS,
    Problem,
    extract_answer,
    grade,
    sample_problems,
    split_of,
    worked_solution,
)


def test_tokenizer_round_trips_exactly(char_tokenizer, tmp_path):
    char_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "123+989=3+9+0=12,2+8+1=11,1+9+1=11;1112 Hello, world!"
    ids = char_tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert len(ids) == len(text)  # one token per character
    assert loaded.get_vocab() == char_tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (
        char_tokenizer.pad_token_id,
        char_tokenizer.eos_token_id,
        "left",
    )
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text


def test_worked_solution_format():
    assert worked_solution(47, 38) == "7+8+0=15,4+3+1=08;85"
    assert worked_solution(999, 1) == "9+1+0=10,9+0+1=10,9+0+1=10;1000"
    # the second teacher's style: the same columns, sum first; same final answer for the verifier
    assert worked_solution(47, 38, "sum_first") == "15=7+8+0,08=4+3+1;85"
    assert grade(worked_solution(999, 1, "sum_first"), "1000") == 1.0
    with pytest.raises(ValueError, match="style"):
        worked_solution(1, 2, "words")
    assert Problem(5, 7).prompt == "5+7=" and Problem(5, 7).answer == "12"


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("7+8+0=15,4+3+1=08;85", "85", 1.0),
        ("7+8+0=15,4+3+1=08;86", "85", 0.0),  # wrong answer
        ("7+8+0=15,4+3+1=08", "85", 0.0),  # no final answer
        ("85", "85", 0.0),  # no worked solution marker
        (";85 ", "85", 1.0),
        (";0085", "85", 1.0),  # numeric comparison
        (";8a5", "85", 0.0),  # malformed
        ("", "85", 0.0),
    ],
)
def test_verifier(response, reference, expected):
    assert grade(response, reference) == expected


def test_extract_answer_takes_the_last_marker():
    assert extract_answer("1;2;3") == "3"
    assert extract_answer("no answer") is None


def test_splits_never_overlap_and_are_deterministic():
    seen = {}
    for split in SPLITS:
        problems = sample_problems(split, 300, digits=(2, 3), seed=0)
        assert problems == sample_problems(split, 300, digits=(2, 3), seed=0)
        assert len(set(problems)) == 300
        for p in problems:
            assert split_of(p.a, p.b) == split
            assert (p.a, p.b) not in seen, f"{p} in both {seen.get((p.a, p.b))} and {split}"
            seen[(p.a, p.b)] = split


def test_sample_problems_digits_and_capacity():
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 for p in sample_problems("eval", 200, digits=(3,)))
    with pytest.raises(ValueError, match="holds about"):
        sample_problems("eval", 100, digits=(1,))
    with pytest.raises(ValueError, match="unknown split"):
        sample_problems("nope", 1)
