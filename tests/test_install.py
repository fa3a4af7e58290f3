"""A regular (non-editable) install, as `pip install .` or a wheel gives it: the recipes ship inside the package, so
`--config <recipe>` and `fcmae demo` work outside the source checkout.

The install goes into a fresh venv that sees this interpreter's site-packages (torch & co. are not reinstalled)
but not the source tree: every command runs from an empty folder with PYTHONPATH unset.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A venv with fcmae pip-installed (non-editable) from a copy of the checkout -> {python, fcmae, env, cwd}."""
    tmp = tmp_path_factory.mktemp("install")
    src, venv = tmp / "src", tmp / "venv"
    shutil.copytree(REPO, src, ignore=IGNORE)  # pip builds in-tree: keep build/ and egg-info out of the checkout
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # This interpreter's packages (torch, timm, ...) on the new venv's path, after its own site-packages. A plain
    # path line: .pth files there (e.g. an editable install of this checkout) are not processed.
    Path(purelib, "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-index", str(src)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"python": python, "fcmae": venv / "bin" / "fcmae", "env": env, "cwd": cwd, "purelib": Path(purelib)}


def fcmae(installed: dict, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([installed["fcmae"], *argv], capture_output=True, text=True, env=installed["env"],
                          cwd=installed["cwd"], timeout=timeout)


def test_installed_copy_is_the_one_imported(installed):
    out = subprocess.run([installed["python"], "-c", "import fcmae, fcmae.recipes as r; print(fcmae.__file__); "
                          "print(r.recipes_dir())"], capture_output=True, text=True, env=installed["env"],
                         cwd=installed["cwd"], check=True).stdout.split()
    assert out[0].startswith(str(installed["purelib"])) and out[1] == str(installed["purelib"] / "fcmae" / "configs")
    shipped = sorted(p.relative_to(installed["purelib"] / "fcmae" / "configs").as_posix()
                     for p in (installed["purelib"] / "fcmae" / "configs").glob("*/*.yaml"))
    assert shipped == sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").glob("*/*.yaml"))


def test_installed_recipe_by_name(installed):
    done = fcmae(installed, "pretrain", "--config", "pretrain/demo", "--print-config", "optim.epochs=3")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    assert rows["optim.epochs"] == ["3", "800", "override"]
    assert rows["model.decoder_dim"] == ["128", "512", "recipe"] and rows["data.format"][-1] == "recipe"
    # a bare size for the command's kind, and the README's configs/... paths, outside the checkout
    for config in ("tiny", "configs/finetune/tiny.yaml"):
        done = fcmae(installed, "finetune", "--config", config, "--print-config")
        assert done.returncode == 0, done.stderr
        assert "convnextv2_tiny" in done.stdout
    assert not any(installed["cwd"].iterdir())  # --print-config writes nothing


def test_installed_demo_runs(installed):
    """`fcmae demo --quick` end to end from the installed package (its recipes found without a checkout)."""
    done = fcmae(installed, "demo", "--quick", "--out", "demo", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "FCMAE-pretrained" in done.stdout and "from scratch" in done.stdout
    assert (installed["cwd"] / "demo" / "finetune-fcmae" / "model.safetensors").is_file()
