"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class AnomnetError(Exception):
    """Base class of every error anomnet raises on bad input or bad settings."""


class ImageReadError(AnomnetError):
    """An image or mask file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class DatasetError(AnomnetError):
    """A dataset folder is missing, empty or not in a known layout."""


class ModelFormatError(AnomnetError):
    """A saved model folder is missing, damaged or written by another format version."""


class BackboneWeightsError(AnomnetError):
    """A backbone weights file is missing or does not fit the architecture."""


class ConfigError(AnomnetError):
    """A setting has a value that cannot be used."""


class NotFittedError(AnomnetError):
    """A detector (or a backbone waiting for a user's weights file) is used before ``fit`` or ``load``."""
