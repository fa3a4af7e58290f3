"""One shard read from where it lives (a local file, `http(s)://` through curl, a `pipe:` command), to its end or
failing loudly.

webdataset opens the URL (`webdataset.gopen`: curl for http(s), a shell for `pipe:`), but its own tar pipeline only
warns and moves on when a stream breaks, and a transfer cut short at a member boundary reads as a shorter, valid tar.
So each shard is read here to the end of its stream and the exit status of its process is checked after the last
sample: a shard that cannot be read whole raises `ShardReadError`, never a silently shorter epoch.
"""
from __future__ import annotations

import subprocess
from typing import Any, Iterator

import webdataset as wds
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from fcmae.engine.errors import DataReadError

# curl's exit codes (`man curl`, EXIT CODES) that a shard server going away produces
CURL_EXITS = {6: "could not resolve the host", 7: "could not connect", 18: "the transfer ended early",
              22: "the server answered with an HTTP error", 28: "timed out", 35: "the TLS handshake failed",
              52: "the server sent nothing", 55: "sending failed", 56: "the connection broke"}
# curl's write error, a shell's SIGPIPE status, a process killed by SIGPIPE: the reader closed the pipe first
CLOSED_BY_READER = (23, 141, -13)


def is_url(path: str) -> bool:
    """A shard webdataset opens itself (a URL scheme or a `pipe:` command), not a local file."""
    return "://" in path or path.startswith("pipe:")


def source_fix(url: str) -> str:
    """How the fix of a failed read ends: 'rerun ... once <this>'."""
    if url.startswith("pipe:"):
        return "the command works again"
    return "the server is back" if "://" in url and not url.startswith("file:") else "the file is back"


class ShardReadError(DataReadError):
    """A shard that could not be read to its end: a server gone, a `pipe:` command that failed, a file removed."""

    @classmethod
    def at(cls, url: str, reason: str) -> ShardReadError:
        return cls(f"reading shard {url} failed ({reason})", fix=source_fix(url))


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of shard `url` in tar order (dicts: `__key__`, `__url__`, one entry per file extension);
    `ShardReadError` when it cannot be opened or read to its end. Leaving early (the consumer stops) closes the
    stream without an error."""
    try:
        stream = wds.gopen(url)
    except Exception as e:  # noqa: BLE001 - FileNotFoundError, a pipe that cannot start, ...
        raise ShardReadError.at(url, describe(e)) from None
    try:
        files = tar_file_expander([dict(url=url, stream=stream)], handler=reraise_exception)
        yield from group_by_keys(files, handler=reraise_exception)
        while stream.read(1 << 16):  # the rest (tar padding): the transfer is whole only once its end is read
            pass
    except GeneratorExit:  # the consumer has what it needs: the reader's own close, never an error
        close(stream)
        raise
    except Exception as e:  # noqa: BLE001 - a tar error on a broken stream, the pipe's own IOError, ...
        raise ShardReadError.at(url, exit_reason(url, close(stream)) or describe(e)) from None
    reason = exit_reason(url, close(stream))  # a stream can end cleanly before its process reports the failure
    if reason:
        raise ShardReadError.at(url, reason)


def close(stream: Any) -> int | None:
    """Close a shard's stream; -> the exit status of its process (curl, a `pipe:` command), None for a file.
    A process still writing gets a closed pipe (and is killed if it does not stop within a minute)."""
    proc = getattr(stream, "proc", None)  # webdataset's Pipe
    if proc is None:
        stream.close()
        return None
    if not stream.stream.closed:
        stream.stream.close()  # also keeps Pipe.close (its __del__) from waiting and raising again
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def exit_reason(url: str, status: int | None) -> str | None:
    """What a non-zero exit status of the shard's process means, or None when it says nothing went wrong."""
    if status is None or status == 0 or status in CLOSED_BY_READER:
        return None
    if url.startswith("pipe:"):
        return f"the command exited with status {status}"
    return f"curl exit {status}: {CURL_EXITS.get(status, 'see man curl, EXIT CODES')}"


def describe(e: Exception) -> str:
    """An exception as 'Type: first line' (the pipeline's own messages append the stream's repr: left out)."""
    first = str(e.args[0]) if e.args else str(e)
    return f"{type(e).__name__}: {first.split(' @ ')[0].splitlines()[0] if first else type(e).__name__}"
