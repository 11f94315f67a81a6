"""Stage zero: teacher-consistent SFT. The student learns its teacher's answers (``sft``: the
response-only loss through the chunked kernels, and the training loop)."""
