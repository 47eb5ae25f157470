"""Every error an operator can cause. cli.main prints any VisorError as one line; other exceptions are bugs."""

from pathlib import Path


class VisorError(Exception):
    """A problem an operator can fix; str() is the whole one-line message."""


class ConfigError(VisorError):
    """A config or run-config file that cannot be used, named with the problem."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = Path(path), problem


class HomeError(VisorError):
    """The home folder is missing, not initialised, or already exists."""


class NodeError(VisorError):
    """The node (its admin socket or one of its commands) did not answer as expected."""


class FetchError(VisorError):
    """A release could not be found, downloaded or verified."""


class ProtocolError(VisorError):
    """A frame on one of our sockets that we cannot decode."""
