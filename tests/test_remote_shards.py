"""Shards streamed from a server (issue 29, point 4): `data.path` as an `http://` brace pattern (webdataset reads it
with curl) and as `pipe:` commands, against an HTTP server on 127.0.0.1 run by the test. The oracle is the same
shards read from the local disk: the same images in the same order, the same weights after a run; a server that
dies mid-epoch stops the run with one line, and the rerun resumes to the weights of an uninterrupted run."""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fcmae.cli import main
from fcmae.data.shard_stream import ShardReadError, shard_samples
from fcmae.data.shards import ShardImages, count_samples, expand_shards, raise_read_errors
from fcmae.data.transforms import train_transform
from fcmae.data.write_shards import write_shards

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # in CI a missing curl fails these tests instead
pytestmark = pytest.mark.skipif(shutil.which("curl") is None and not CI, reason="webdataset reads http(s) with curl")
# atto at 64 px (model.patch_size=auto: 16, a 4x4 grid), 24 images in 3 shards of 8, global batch 8: 3 steps/epoch
RUN = ["device=cpu", "model.decoder_dim=32", "data.image_size=64", "data.batch_size=8", "data.num_workers=0",
       "data.shuffle_buffer=8", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3", "checkpoint.every_steps=1",
       "checkpoint.keep_every_epochs=0", "log.every_steps=1", "log.vis_every_epochs=0", "log.progress=false",
       "log.tensorboard=false"]
PATTERN = "shard-{000000..000002}.tar"


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the shard folder; once the server's `budget` of shard requests is spent, a shard's transfer stops
    after `server.cut(data)` (default: half of it) and the connection closes (a server dying mid-transfer: curl
    exits 18)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        if self.path.endswith(".tar"):
            server.requests.append(self.path)
            if len(server.requests) > server.budget:
                data = open(self.translate_path(self.path), "rb").read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(server.cut(data))
                self.close_connection = True
                return
        super().do_GET()


@pytest.fixture
def serve():
    """serve(folder) -> (base URL, the server: .budget of whole shard transfers, .requests made)."""
    servers = []

    def start(folder: str):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ShardHandler, directory=folder))
        server.daemon_threads = True
        server.budget, server.requests, server.cut = 10**9, [], lambda data: data[: len(data) // 2]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shards"))
    write_shards(folder, out, shard_size=8)
    return out


@pytest.fixture(scope="module")
def coloured_shards(tmp_path_factory) -> str:
    """24 single-colour PNGs (image i: red 10 i) in 4 shards of 6: a crop of one still names its image."""
    src, out = tmp_path_factory.mktemp("colours"), str(tmp_path_factory.mktemp("coloured-shards"))
    for i in range(24):
        Image.new("RGB", (40, 40), (10 * i, 255 - 10 * i, 128)).save(src / f"img_{i:02d}.png")
    write_shards(str(src), out, shard_size=6, shuffle=False)
    return out


def epoch_batches(urls: list[str], workers: int, batches: int) -> list[torch.Tensor]:
    ds = ShardImages(urls, train_transform(32, 3), 3, batch=4, seed=0, shuffle_buffer=6)
    ds.set_epoch(0)
    loader = raise_read_errors(DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2))
    return [next(loader)[0] for _ in range(batches)]


def test_http_and_pipe_shards_read_as_the_local_ones_split_over_two_workers(coloured_shards, serve):
    base, server = serve(coloured_shards)
    pattern = "shard-{000000..000003}.tar"
    http_urls = expand_shards(f"{base}/{pattern}")
    assert http_urls == [f"{base}/shard-00000{i}.tar" for i in range(4)] and count_samples(http_urls) == 24
    local = epoch_batches(expand_shards(coloured_shards), 2, 6)  # one epoch: 6 batches of 4
    over_http = epoch_batches(http_urls, 2, 6)
    piped = epoch_batches(expand_shards(f"pipe:cat {coloured_shards}/{pattern}"), 2, 6)
    for a, b, c in zip(local, over_http, piped):
        assert torch.equal(a, b) and torch.equal(a, c)
    red = torch.cat(over_http)[:, 0].float().mean(dim=(1, 2))  # a crop of image i is solid red 10 i
    seen = sorted(int(round(r / 10)) for r in red.tolist())
    assert seen == list(range(24))  # each of the 24 images exactly once in the epoch, over the two workers
    assert {f"/shard-00000{i}.tar" for i in range(4)} <= set(server.requests)


def test_shard_patterns_and_sample_counts_of_remote_shards(shards, serve, tmp_path):
    base, _ = serve(shards)
    assert count_samples(expand_shards(f"{base}/{PATTERN}")) == 24  # sizes.json fetched from the same server
    no_sizes = tmp_path / "no-sizes"
    no_sizes.mkdir()
    for name in os.listdir(shards):
        if name.endswith(".tar"):
            shutil.copy(os.path.join(shards, name), no_sizes)
    bare, _ = serve(str(no_sizes))
    assert count_samples(expand_shards(f"{bare}/{PATTERN}")) is None
    assert count_samples(expand_shards(f"pipe:cat {shards}/{PATTERN}")) is None
    with pytest.raises(ValueError, match=r"cannot open s3:// URLs.*pipe:aws s3 cp"):
        expand_shards("s3://bucket/train-{000000..000127}.tar")
    with pytest.raises(ValueError, match="names a folder on a server .* cannot be listed; give a brace pattern"):
        expand_shards(f"{base}/")
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_shards(f"{base}/shard-{{000000..000002.tar")


def test_a_stream_cut_between_two_samples_is_an_error_not_a_shorter_shard(shards, serve):
    """A tar stream that ends at a member boundary reads as a valid, shorter tar: only the exit status of the process
    behind it (curl, a pipe: command) tells, once the stream has been read to its end."""
    base, server = serve(shards)
    url, path = f"{base}/shard-000001.tar", os.path.join(shards, "shard-000001.tar")
    assert len(list(shard_samples(url))) == 8
    with tarfile.open(path) as tar:
        third = [m.offset for m in tar][2 * len(tar.getnames()) // 8]  # where the third sample's first file starts
    server.budget, server.cut = 0, lambda data: data[:third]
    with pytest.raises(ShardReadError, match=rf"reading shard {re.escape(url)} failed \(curl exit 18: the transfer "
                                             r"ended early\)"):
        list(shard_samples(url))
    # a command that closes its output before it fails: the reader sees a clean end of stream first
    command = f"pipe:head -c {third} {path}; exec 1>&-; sleep 0.3; exit 3"
    with pytest.raises(ShardReadError, match=r"failed \(the command exited with status 3\)"):
        list(shard_samples(command))


@pytest.mark.parametrize("where, words", [
    ("bare", ["cannot tell how many samples", "no sizes.json", "set data.num_samples"]),
    ("pipe", ["cannot tell how many samples", "pipe: commands have no sizes.json", "set data.num_samples"]),
    ("down", ["cannot read http://127.0.0.1:", "/sizes.json", "is the server up", "data.num_samples"]),
    ("few", ["the 3 shards of", "cannot feed 1 process(es) x 4 loader worker(s)", "lower data.num_workers"]),
    ("no curl", ["names http(s) shards, which webdataset reads with curl, but curl is not installed here"]),
])
def test_remote_shards_refused_in_one_line_before_training(shards, serve, tmp_path, capsys, monkeypatch, where,
                                                           words):
    no_sizes = tmp_path / "no-sizes"
    no_sizes.mkdir()
    shutil.copy(os.path.join(shards, "shard-000000.tar"), no_sizes)
    path = {"bare": lambda: f"{serve(str(no_sizes))[0]}/shard-000000.tar",
            "pipe": lambda: f"pipe:cat {shards}/{PATTERN}",
            "down": lambda: f"{closed_port_url()}/{PATTERN}",
            "few": lambda: f"{serve(shards)[0]}/{PATTERN}",
            "no curl": lambda: f"{serve(shards)[0]}/{PATTERN}"}[where]()
    if where == "no curl":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "run"
    workers = "data.num_workers=4" if where == "few" else "data.num_workers=0"
    assert main(["pretrain", *RUN, workers, f"output_dir={out}", f"data.path={path}"]) == (1 if where == "down" else 2)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def closed_port_url() -> str:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcmae", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_server_dying_mid_epoch_stops_in_one_line_and_the_rerun_resumes(shards, serve, tmp_path):
    reference = tmp_path / "local"  # the oracle: the same shards from the local disk, uninterrupted
    # in a process like the runs it is compared with (one thread: another thread count sums in another order)
    assert cli("pretrain", *RUN, f"output_dir={reference}", f"data.path={shards}/{PATTERN}").returncode == 0
    base, server = serve(shards)
    # no workers: shards are read as the steps need them, 7 in all (the readability check's first, then 3 for epoch
    # 1, 3 for epoch 2: the shuffle buffer fills across shard and pass boundaries); the 7th, for step 5, dies halfway
    server.budget = 6
    out = tmp_path / "run"
    argv = ["pretrain", *RUN, f"output_dir={out}", f"data.path={base}/{PATTERN}"]
    r = cli(*argv)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    m = re.fullmatch(rf"fcmae pretrain: error: reading shard {re.escape(base)}/shard-00000\d\.tar failed \(curl exit "
                     rf"18: the transfer ended early\); {re.escape(str(out / 'last.pt'))} holds step (\d+): rerun the "
                     r"same command to resume once the server is back", line)
    assert m, line
    step = int(m.group(1))
    assert step == 4 and torch.load(out / "last.pt", weights_only=True)["step"] == 4  # one step into epoch 2
    assert "patch size 16 (auto: 4x4 grid at 64 px)" in r.stdout.splitlines()[0]
    server.budget = 10**9  # the server is back
    r = cli(*argv)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert f"resumed from {out / 'last.pt'}: epoch 1, step {step}" in r.stdout
    got, want = (torch.load(d / "last.pt", weights_only=True) for d in (out, reference))
    assert got["step"] == want["step"] == 6 and got["model_args"]["patch_size"] == 16
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k


def test_server_dying_under_dataloader_workers_is_one_line_too(shards, serve, tmp_path):
    """The failure happens in a DataLoader worker process: still one line, no worker traceback, nothing trained."""
    base, server = serve(shards)
    server.budget = 1  # the readability check's shard only
    out = tmp_path / "run"
    r = cli("pretrain", *RUN, "data.num_workers=2", f"output_dir={out}", f"data.path={base}/{PATTERN}")
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert line.startswith(f"fcmae pretrain: error: reading shard {base}/shard-00000") and line.endswith(
        "failed (curl exit 18: the transfer ended early); no checkpoint was written yet: rerun the same command to "
        "start again once the server is back"), line
    assert not (out / "last.pt").exists()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
