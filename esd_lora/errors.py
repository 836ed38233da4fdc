"""The errors esd-lora reports to its user as one line.

Each stage raises its own subclass of `EsdLoraError`; the CLI prints those as one line naming the key,
file or flag, and treats any other exception as a bug (traceback included).
"""

from __future__ import annotations


class EsdLoraError(Exception):
    """Base of every error whose message is a complete one-line explanation for the user."""


def reason(err: BaseException) -> str:
    """The first line of a library's exception message (or its type), to quote in a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class RecipeError(EsdLoraError, ValueError):
    """A recipe or an override is wrong; the message names the key."""


class ModelLoadError(EsdLoraError, RuntimeError):
    """A model could not be loaded; the message says what could not be reached."""


class TargetError(EsdLoraError, ValueError):
    """A target preset, regex or list selected no layer, or named a layer that does not exist."""


class AdapterError(EsdLoraError, ValueError):
    """An adapter is missing, unreadable or was trained for another base model."""


class OutputError(EsdLoraError, ValueError):
    """An output path would overwrite the user's files or cannot be written."""


class ExportError(EsdLoraError, ValueError):
    """A model or adapter cannot be written in the requested layout."""


class ConceptError(EsdLoraError, ValueError):
    """A concept name that the scorer or the toy vocabulary does not know."""


class TrainingError(EsdLoraError, RuntimeError):
    """Training cannot go on (e.g. the loss stopped being finite); the last checkpoint is kept."""
