"""Errors that name the file, key, model or tensor at fault."""


class PsomergeError(Exception):
    """Base class for errors a user can act on."""


class CheckpointError(PsomergeError):
    """A checkpoint folder cannot be read, or its tensors are unusable."""


class IncompatibleModelsError(PsomergeError):
    """Models cannot be merged: architectures, tensor names, shapes or vocabularies differ."""


class ConfigError(PsomergeError):
    """A recipe or config file has a missing, unknown or invalid key."""


class CacheError(PsomergeError):
    """A cache file (fitness, judge) cannot be used: corrupt, or not a cache at all."""


class RunLockedError(PsomergeError):
    """Another process is running in the same run folder."""
