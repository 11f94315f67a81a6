"""A character-level tokenizer in Hugging Face format, built locally (no hub is reachable).

It is a ``tokenizers`` BPE model with one token per printable ASCII character and no merges,
wrapped in ``PreTrainedTokenizerFast``: it saves and loads with ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` exactly like a real model's tokenizer, so every code path that
serves a real model serves the toy one too.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# Printable ASCII minus the whitespace controls: enough for the toy task and for error messages.
CHARACTERS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()  # join characters back without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=4096,
        padding_side="left",
    )
    return tokenizer
