"""What an offline W&B run logged, read back from its `run-ID.wandb` file (wandb has no reader of its own for it
offline: `wandb.Api` asks the server). The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of
chunks, each with a 7-byte header: CRC32C, length, type) of W&B's own protobuf `Record`s."""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Iterator

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
BLOCK = 32 * 1024


def records(path: str) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record`s of a .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """One offline run folder ({dir}/wandb/offline-run-*-ID): its run record, history rows, config and summary."""

    def __init__(self, folder: str):
        self.folder = folder
        (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
        self.run, self.history, self.config, self.summary = None, [], {}, {}
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                self.run = r.run
                self.config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                self.config.update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                self.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})

    def series(self, key: str) -> list[tuple[int, Any]]:
        """[(W&B step, value)] of `key` in the history."""
        return [(row["_step"], row[key]) for row in self.history if key in row]

    def images(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.folder, "files", "media", "images", "*.png")))


def offline_runs(output_dir: str) -> list[OfflineRun]:
    """The offline run folders under {output_dir}/wandb, oldest first (one per process: W&B continues an offline run
    in a new folder with the same id)."""
    runs = [OfflineRun(f) for f in glob.glob(os.path.join(output_dir, "wandb", "offline-run-*"))]
    return sorted(runs, key=lambda r: (r.run.start_time.seconds, r.run.start_time.nanos))
