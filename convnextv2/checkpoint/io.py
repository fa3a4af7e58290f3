"""Safe checkpoint files: load untrusted files without running code, write atomically.

Loading never unpickles arbitrary objects: `.safetensors` goes through safetensors, everything else through
`torch.load(weights_only=True)` (tensors, dicts, lists, numbers, strings; plus `argparse.Namespace`, which the
reference repo's training checkpoints carry as `args` and which holds plain data). Every failure becomes one
`CheckpointError` (a `ValueError`) that names the file, the problem and the fix.

Writing is atomic (a temp file beside the target, then os.replace), and every way a write can fail - Python's
OSError, torch's opaque RuntimeError from its zip writer, safetensors' SafetensorError - becomes one `WriteError` (an
OSError) naming the file and the cause ("No space left on device"), with the temp file removed and the file that was
there before left as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as _st_load, save_file as _st_save

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Every temp file this project writes starts with this prefix and nothing else does: cleaning up after a killed
# process removes these names only, never a file of the user's (such as `.draft.tmp-1`).
TMP_PREFIX = ".fcmae-tmp."
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, the problem and the fix."""


def _file_kind(path: Path) -> str:
    """'safetensors' | 'zip' (torch >= 1.6) | 'pickle' (legacy torch.save) | 'empty' | 'unknown', from the bytes."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000:  # a header length, not random bytes
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode
        return "pickle"
    return "unknown"


def load_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file without executing code -> whatever it holds (usually a dict).

    Raises CheckpointError for a missing, empty, truncated or non-checkpoint file, for a pickle whose objects need
    code (custom classes) to load, and for a safetensors export whose metadata describes another model than its
    tensors (the tensors themselves are checked where they are used: convnextv2.checkpoint.validate).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file); check the path")
    kind = _file_kind(path)
    if kind == "empty":
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the write was probably interrupted: re-create it")
    if kind == "unknown":
        with open(path, "rb") as f:
            start = f.read(16)
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors "
            f"(it starts with {start!r}); pass a .pth/.pt/.safetensors file"
        )
    if kind == "safetensors":
        from convnextv2.checkpoint.validate import check_export_metadata

        try:
            tensors = _st_load(str(path), device="cpu")
            metadata = safe_open(str(path), framework="pt").metadata() or {}
        except SafetensorError as e:
            raise CheckpointError(
                f"safetensors file {path} is truncated or corrupt ({e}); re-download or re-export it"
            ) from None
        check_export_metadata(metadata, tensors, str(path))  # its header must describe its tensors
        return tensors
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (its zip directory is missing); re-download or re-save it"
        )
    try:
        # torch's notes on what it meets (sparse invariants, legacy storages) are not the user's business: the
        # readers check every tensor and say in one line what is wrong
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path} holds a pickled Python object ({found.group(1)}) that needs code to load; untrusted files "
                "are only loaded with weights_only=True. If you trust the file, load it yourself with "
                "torch.load(..., weights_only=False) and re-save just its state_dict (tensors only)"
            ) from None
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); re-download or re-save it") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        what = "a truncated or corrupt PyTorch checkpoint" if kind == "pickle" else "not a readable PyTorch checkpoint"
        raise CheckpointError(f"{path} is {what} ({type(e).__name__}: {e}); re-download or re-save it") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path(path: str | os.PathLike) -> str:
    """The temp file next to `path` that this process writes before renaming it onto `path`: TMP_PREFIX, the name,
    the pid (two processes never share one)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}")


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only, I/O error): the message names the file and the cause.
    `errno` is the cause's (errno.ENOSPC for a full disk) when known."""


def _cause_errno(e: BaseException, folder: Path) -> int | None:
    """The errno behind a failed write: the OSError's own, the 'os error N' safetensors' message carries, or ENOSPC
    when the folder's file system has no space left (torch's zip writer says only 'unexpected pos ...')."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    found = re.search(r"os error (\d+)", str(e))
    if found:
        return int(found.group(1))
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free == 0:
            return errno.ENOSPC
    return None


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError:
    """`e`, raised while writing `path`, as one WriteError: 'cannot write PATH: CAUSE[; what to do]'."""
    if isinstance(e, WriteError):
        return e
    path = Path(path)
    code = _cause_errno(e, path.parent if path.parent.exists() else Path("."))
    cause = os.strerror(code) if code else f"{type(e).__name__}: {e}"
    hint = {errno.ENOSPC: "; free some space or write elsewhere",
            errno.EDQUOT: "; free some of your quota or write elsewhere"}.get(code, "")
    error = WriteError(f"cannot write {path}: {cause}{hint}")
    error.errno = code
    return error


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Any write failure inside the block (OSError, torch's RuntimeError, SafetensorError) -> `write_error(path)`."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        raise write_error(path, e) from None


class _RecordingFile:
    """A binary file that keeps the first OSError of its writes: torch's zip writer swallows it and raises an opaque
    RuntimeError ('unexpected pos 704 vs 598'), so this is where the errno of a full disk survives."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def torch_save(obj: Any, f: BinaryIO) -> None:
    """torch.save onto an open binary file; a failed write raises its OSError (errno intact), not torch's message."""
    recording = _RecordingFile(f)
    try:
        torch.save(obj, recording)
    except RuntimeError:
        if recording.error is not None:
            raise recording.error from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file in path's folder, then os.replace it onto path: readers never see half.
    A failure raises a WriteError naming `path` (see `write_error`); the temp file is removed, `path` left as it was."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        os.close(fd)
    try:
        with writing(path):
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600: give it the mode open() would have
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `dst` to write a folder's files into; when the block ends they are moved into `dst`
    (created if missing; files of the same name replaced, others kept). On any failure the temp folder is removed
    and `dst` is left as it was: never half a folder. Write failures become a WriteError naming the file."""
    dst = Path(dst)
    with writing(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}.", dir=dst.parent))
    try:
        try:
            yield tmp
        except WriteError as e:  # name the file as the user will know it, not its temp folder
            error = WriteError(str(e).replace(str(tmp), str(dst)))
            error.errno = e.errno
            raise error from None
        with writing(dst):
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700: give it the mode mkdir would have
            if not dst.exists():
                os.rename(tmp, dst)
                return
            for f in sorted(tmp.iterdir()):  # renames within one file system: no space needed, nothing half
                os.replace(f, dst / f.name)
            tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_weights_suffix(path: str | os.PathLike) -> None:
    """ValueError unless path ends in a weights suffix we write (.safetensors, .pth, .pt, .bin)."""
    if Path(path).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"cannot tell the file type of {path}: name it *.safetensors (recommended), *.pth or *.pt"
        )


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a flat {name: tensor} dict atomically: safetensors for *.safetensors (with `metadata` in its header: the
    architecture to build, the preprocessing of convnextv2.checkpoint.hub), torch.save otherwise (a plain state_dict:
    metadata is not stored)."""
    check_weights_suffix(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if Path(path).suffix == ".safetensors":
        meta = {**(metadata or {}), "format": "pt"}
        return atomic_write(path, lambda tmp: _st_save(tensors, tmp, metadata=meta))
    return save_torch(tensors, path)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) atomically; obj must stay loadable with weights_only=True (plain containers and tensors)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch_save(obj, f)
    return atomic_write(path, write)
