"""Run Python code the way a user pastes it: in a fresh interpreter, where nothing the tests imported is loaded."""
from __future__ import annotations

import os
import subprocess
import sys

# timm's warning when a file's stem does not match the channel count its pretrained_cfg declares
CHANNEL_WARNING = "input_size declares"


def run_fresh(code: str, cwd: str | os.PathLike) -> str:
    """Run `code` with this interpreter in a new process (same environment, so the same checkout) -> its stdout. The
    test fails with the process's stderr when it exits non-zero or timm warned about the channel count."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert CHANNEL_WARNING not in done.stderr, done.stderr
    return done.stdout


def logits_script(jobs: list[tuple[str, str, str]]) -> str:
    """A script that pastes each (load line, inputs file, logits file) job's line into an empty namespace, runs the
    model it builds (`model`) in eval mode on the saved inputs and saves the logits; it prints whether `convnextv2` was
    imported before the first line (the line must import what it needs) and after the last."""
    return f"""import sys, torch
jobs = {jobs!r}
before = "convnextv2" in sys.modules
for line, inputs, out in jobs:
    scope = {{}}
    exec(line, scope)
    with torch.no_grad():
        torch.save(scope["model"].eval()(torch.load(inputs)), out)
print(before, "convnextv2" in sys.modules)
"""
