"""Typed errors raised at the user-facing boundaries.

Every message says what is wrong *and* what to do about it. The CLI prints ``str(error)`` on one
line and exits with status 2, so no traceback is needed to act on one of these.
"""


class LopdError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in lightning-opd."""


class ConfigError(LopdError):
    """A configuration value is out of range or inconsistent with another."""


class InputError(LopdError):
    """An input file or directory is missing, empty or malformed (prompt sets, model directories)."""


class TokenizerMismatchError(LopdError):
    """Two models (or a model and a tokenizer) do not share one vocabulary."""


class TeacherConsistencyError(LopdError):
    """The scoring teacher is not the teacher that wrote the student's SFT data."""


class StoreError(LopdError):
    """A logprob store is missing, corrupt, foreign or inconsistent with its manifest."""


class StoreVersionError(StoreError):
    """A store was written in a format version this release cannot read."""


class OutputExistsError(LopdError):
    """The output directory already holds a different run; nothing is overwritten silently."""


class TrainingError(LopdError):
    """Training hit a state it must not continue from (NaN loss, mismatched resume checkpoint)."""


class TeacherServerError(LopdError):
    """A teacher server (``--teacher-url``) is unreachable, keeps failing, or answers in an unknown format."""
