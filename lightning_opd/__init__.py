"""lightning-opd: offline on-policy distillation of language models.

Stage zero fine-tunes the student on its teacher's answers, stage one samples rollouts from the
student and scores every sampled token with that same teacher into a Parquet logprob store, and
stage two trains the student from the store with no teacher process anywhere.
"""

__version__ = "0.1.0"
