"""One live run per output_dir: an OS lock on `{output_dir}/.fcmae-lock`, held by rank 0 for the whole run.

The lock is a POSIX record lock (`fcntl.lockf`), not `flock`: the kernel drops it when the process that holds it
ends, however it ends (kill -9 included), so it never outlives its run; and it belongs to that process alone, not to
the DataLoader workers it forks (which can outlive a killed process by a few seconds and would keep a `flock`). NFS
(v4, or v3 with lockd) carries these locks to the server, so they hold across nodes; where the server loses a dead
node's lock only when its lease runs out (about 90 s on NFSv4), a rerun in that window is refused and can simply be
retried. A filesystem without locks (the call fails with ENOLCK, EOPNOTSUPP or ENOSYS) gets a warning and the run
goes on without the guarantee.

The file stays after the run: deleting a lock file that another process may have opened would let two runs lock two
different files. It records who holds it (pid, host, start time), written once the lock is taken.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from convnextv2.checkpoint.io import writing

LOCK_NAME = ".fcmae-lock"
HELD = (errno.EACCES, errno.EAGAIN)  # what lockf says when another process holds the lock
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # a filesystem that cannot lock


def describe_holder(path: str) -> str:
    """'pid 123 on host h, since 2026-12-06 10:00:01' from a lock file (its holder may not have written it yet)."""
    try:
        with open(path) as f:
            holder = json.loads(f.read())
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and host not recorded yet"


class RunLock:
    """The open lock file of a run folder. held=False: the filesystem has no locks (the run goes on without)."""

    def __init__(self, fd: int, path: str, held: bool) -> None:
        self.fd, self.path, self.held = fd, path, held

    @classmethod
    def take(cls, folder: str, create: bool) -> RunLock | None:
        """Lock {folder}/.fcmae-lock without waiting. create=False: None when there is no lock file (nothing is
        written); create=True: make it, ValueError when another run made it first. ValueError (one line naming the
        holder) when a live process holds it."""
        path = os.path.join(folder, LOCK_NAME)
        try:  # O_RDWR: NFS grants an exclusive POSIX lock only on a file open for writing
            fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0) | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return None
        except FileExistsError:  # a run that started while this one loaded its data: it owns the folder now
            raise ValueError(f"output_dir {folder!r} was taken by another run ({describe_holder(path)}) while this "
                             "one was loading its data; wait for that run to end and rerun to continue it, or choose "
                             "another output_dir") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in NO_LOCKS:
                print(f"fcmae: warning: output_dir {folder!r} cannot be locked ({os.strerror(e.errno)}: its "
                      "filesystem has no file locks), so a second run started in it would not be refused; start one "
                      "run per output_dir", file=sys.stderr, flush=True)
                return cls(fd, path, held=False)
            os.close(fd)
            if e.errno in HELD:
                raise ValueError(f"output_dir {folder!r} is in use by another run ({describe_holder(path)}); wait "
                                 "for it to end, or choose another output_dir") from None
            raise
        return cls(fd, path, held=True)

    def record(self) -> None:
        """Write who holds the lock (read by a run that is refused), through the locked descriptor: opening and
        closing the file again would drop a POSIX lock."""
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n"
        with writing(self.path):  # a full disk: one line naming the lock file
            os.pwrite(self.fd, holder, 0)
            os.ftruncate(self.fd, len(holder))

    def release(self) -> None:
        """Close the file, which drops the lock (the file stays: see the module docstring)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
