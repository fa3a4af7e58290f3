"""Errors that stop a training run for a reason outside it, light to import (the data layer raises them, in its
loader workers too)."""
from __future__ import annotations


class DataReadError(OSError):
    """The training data stopped arriving mid-run (a shard server gone, a `pipe:` command that failed); the message
    names the source. `fix` ends the message's advice: 'rerun the same command to resume once <fix>'."""

    def __init__(self, message: str, fix: str = "the data can be read again"):
        super().__init__(message)
        self.fix = fix

    def __reduce__(self):  # from a DataLoader worker to the main process, message and fix intact
        return type(self), (str(self), self.fix)
