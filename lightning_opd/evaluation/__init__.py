"""Grading and measuring: answer verifiers (math-verify, addition), greedy accuracy and pass@k, and
StableOPD's rollout diagnostics (TruncRate, RepRate)."""
