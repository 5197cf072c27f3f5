"""User-facing errors.

Every problem a user can cause (bad file, wrong modality, bad config, corrupt bundle) is raised as a
:class:`BiGLError` carrying what went wrong and how to fix it. The CLI prints both and exits with
status 2 instead of showing a traceback; the Slicer modules show them in a message box.
"""

from __future__ import annotations


class BiGLError(Exception):
    """A problem with the user's input, with a hint on how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  fix: {self.hint}"
        return self.message


class InputError(BiGLError):
    """An image, label map or data folder that cannot be used as given."""


class BundleError(BiGLError):
    """A model bundle that is missing, corrupt, foreign or of a newer format."""


class ConfigError(BiGLError):
    """A training or inference configuration that cannot run."""
