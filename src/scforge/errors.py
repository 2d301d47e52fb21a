"""One exception family for scforge. Every message says what was wrong, where, and how to fix it."""

from __future__ import annotations


class ScforgeError(Exception):
    """Base class of every error scforge raises on purpose."""


class InputDataError(ScforgeError, ValueError):
    """The expression matrix or AnnData given is not usable as it is."""


class GeneIdentityError(ScforgeError, ValueError):
    """Genes could not be matched to a vocabulary, or a gene column is wrong."""


class VocabularyError(ScforgeError, ValueError):
    """A vocabulary file or object is malformed."""


class UnsafeFileError(ScforgeError):
    """A file would need code execution to load (e.g. a pickle with non-data objects)."""


class DependencyError(ScforgeError, ImportError):
    """An optional dependency needed for this feature is not installed."""


class ConfigError(ScforgeError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class CheckpointError(ScforgeError, ValueError):
    """A checkpoint file or folder is missing, truncated, malformed or does not fit the model."""
