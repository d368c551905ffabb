"""Exception types. Every message names the bad value and, where it applies, the valid choices."""

from __future__ import annotations


class CondenseError(Exception):
    """Base class of every error condense raises on purpose."""


class ConfigError(CondenseError, ValueError):
    """A configuration value is invalid (unknown name, out-of-range number, unknown key)."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup missed. ``str()`` gives the plain message (not KeyError's repr)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(CondenseError, FileNotFoundError):
    """A dataset's files are not at any of the searched places."""


class ArtifactError(CondenseError):
    """An artifact directory is missing, truncated, tampered with or of a foreign schema."""


class NonFiniteError(CondenseError, FloatingPointError):
    """A loss or the synthetic images became NaN/inf during synthesis."""


class RankLostError(CondenseError):
    """A collective of a class-parallel run failed or timed out: another rank died or hangs
    (:mod:`condense.distributed`; every rank's checkpoints are kept for ``resume=true``)."""
