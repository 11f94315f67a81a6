"""Stage two: train the student from rollouts and teacher log-probs.

- ``flags``: the training flags shared by offline (``lopd train``) and online (``lopd train-online``)
  training, and the one mapping from those flags to an objective;
- ``step``: the one update step both trainers run (micro-batches, autocast, collate, student
  log-probs, objective, backward, clip, optimizer step);
- ``runs``: run helpers both trainers share (optimizer, checkpoints, metrics log, final model);
- ``gold``: StableOPD's gold-solution mixture.
"""
