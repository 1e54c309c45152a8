"""User-facing errors.

Every mistake a user can make (a wrong path, a corrupt file, a concept for another base) raises
a :class:`StudioError` whose message is one actionable sentence. The CLI prints that sentence on
stderr and exits non-zero, without a traceback; the UI shows it as a notification.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem the user can fix; ``str(err)`` is one sentence saying what to do."""


class ConceptFormatError(StudioError):
    """A concept file is corrupt, truncated, of an unknown version, or not a concept."""


class IncompatibleConceptError(StudioError):
    """A concept was trained for a base whose architecture differs from the loaded one."""


class BaseModelError(StudioError):
    """A base model cannot be found or loaded."""


class DatasetError(StudioError):
    """A training image folder or one of its files is unusable."""


class TrainingError(StudioError):
    """Training stopped (non-finite loss, invalid configuration, ...)."""
