"""Ctrl-C (SIGINT) and SIGTERM while a command runs: training stops after the optimizer step in progress, with
last.pt written there; anything else stops at once. The command then ends with one line and exit status 128 + the
signal (130, 143), never a traceback.

`fcmae.cli.main` installs a `StopSignals` for the command it runs, only over Python's default handlers: a handler
someone else installed (submitit's SIGTERM one under Slurm, whose SIGUSR2 requeues the job) is left alone. The
training loop finds it with `StopSignals.installed()` and runs its steps inside `deferred()`: the first signal then
only records `signum`, which the loop reads after each step; a second one stops at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_HANDLERS = (signal.SIG_DFL, signal.default_int_handler)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by `signum` (SIGINT or SIGTERM); `where`: where it stopped, what is kept, how to go on.
    A KeyboardInterrupt, so that code catching Ctrl-C (a DataLoader worker) treats SIGTERM alike."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(signum, where)
        self.signum, self.where = signum, where

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended: 130, 143

    def __str__(self) -> str:
        return f"interrupted ({signal.Signals(self.signum).name})" + (f" {self.where}" if self.where else "")


class StopSignals:
    """SIGINT / SIGTERM handlers for one command (a context manager: the previous handlers come back on exit).

    Outside `deferred()` a signal raises Interrupted where the program is. Inside, the first one sets `signum` and
    the program goes on to a point where stopping loses nothing; a second one raises at once. A DataLoader worker
    (forked with these handlers) ignores its first signal - Ctrl-C and a SIGTERM to the process group reach it with
    the main process, which decides, then shuts its workers down - and ends quietly on the next one (torch's
    `terminate()` of a worker that did not stop by itself).
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal received while deferring, not acted on yet
        self.deferring = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for sig in SIGNALS:
                if signal.getsignal(sig) in DEFAULT_HANDLERS:
                    self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        from torch.utils.data import get_worker_info

        if self.signum is None and (self.deferring or get_worker_info() is not None):
            self.signum = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals inside only set `signum` (the first one); one still pending when the block ends raises there."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.signum is not None:
            raise Interrupted(self.signum)

    @staticmethod
    def installed() -> StopSignals | None:
        """The StopSignals whose handlers are in place (a command run by fcmae.cli), else None (a library call)."""
        for sig in SIGNALS:
            owner = getattr(signal.getsignal(sig), "__self__", None)
            if isinstance(owner, StopSignals):
                return owner
        return None
