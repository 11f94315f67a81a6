"""Stage one: the SFT'd student samples rollouts and the teacher scores them, into a logprob store.

- ``rollout``: the transformers sampler and the conventions both samplers follow (raw behaviour
  log-probs, EOS kept, per-sample seeds);
- ``vllm_backend``: the vLLM sampler and prompt_logprobs scorer;
- ``samplers``: ``make_sampler`` picks one;
- ``build``: the part-by-part work of ``lopd rollout`` / ``score`` / ``precompute``.

Teacher scoring itself is ``lightning_opd.scoring.score_sequences`` (on the kernels of ``lightning_opd.logprobs`` that every stage uses).
"""
