"""Errors a user can act on. Stage scripts and the CLI print these without a traceback."""


class IteraliteError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ParamsError(IteraliteError):
    """A params.yaml section has an unknown key, a wrong type or a value out of range."""


class CheckpointError(IteraliteError):
    """An artifact is truncated, corrupt, of another format or version, or disagrees with its config."""


class DataError(IteraliteError):
    """Input data is missing or unusable."""


class DivergedError(IteraliteError):
    """A training loop met a non-finite loss or gradient norm: nothing was written."""
