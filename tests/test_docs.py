"""The repository's text points only at what the repository holds: every Markdown link resolves (file and heading),
every repo path named in code, configs and docs exists, and nothing cites documents a user of the repo does not
have (design notes kept outside it)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_SUFFIXES = (".md", ".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt")
TOP_DIRS = ("docs", "bench", "tests", "configs", "scripts", "fcmae", "convnextv2", "jobs", ".ci")
# Documents that lived outside the repository (design notes): a user has none of them.
OUTSIDE = re.compile(r"SPEC ?§|SPEC\.md|\bSPEC's\b|CONTRACTS\.md|ARCHITECTURE\.md|GPU-IMAGE\.md|NOTES-[\w-]+\.md|"
                     r"\.\./shared\b|shared/(?:SPEC|NOTES|GPU)")
REPO_PATH = re.compile(r"(?<![\w/.<{-])((?:%s)/[\w./-]*\w\.(?:md|py|sh|ya?ml|json|toml))\b" % "|".join(
    re.escape(d) for d in TOP_DIRS))
TOP_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z_-]+\.md)\b")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_text_files() -> list[str]:
    """The repository's text files as git knows them (tracked and not ignored), this test left out."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()}): the file list comes from git")
    me = os.path.relpath(__file__, ROOT)
    return sorted(f for f in out.stdout.split() if f.endswith(TEXT_SUFFIXES) and f != me
                  and os.path.isfile(os.path.join(ROOT, f)))


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    body = re.sub(r"```.*?```", "", markdown, flags=re.S)  # '#' lines in code blocks are comments, not headings
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", body, flags=re.M)}


def test_nothing_cites_documents_outside_the_repo():
    found = [f"{f}:{n}: {line.strip()[:100]}" for f in tracked_text_files()
             for n, line in enumerate(read(f).splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "references to documents the repo does not hold:\n" + "\n".join(found)


def test_every_repo_path_named_exists():
    missing = []
    for f in tracked_text_files():
        for n, line in enumerate(read(f).splitlines(), 1):
            for path in REPO_PATH.findall(line) + TOP_DOC.findall(line):
                if not os.path.exists(os.path.join(ROOT, path)):
                    missing.append(f"{f}:{n}: {path}")
    assert not missing, "paths that do not exist in the repo:\n" + "\n".join(missing)


def test_markdown_links_resolve_to_files_and_headings():
    broken = []
    for f in (f for f in tracked_text_files() if f.endswith(".md")):
        for target in MD_LINK.findall(read(f)):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(ROOT, os.path.dirname(f), path)) if path else os.path.join(ROOT, f)
            if not os.path.exists(dest):
                broken.append(f"{f}: {target} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in anchors(read(os.path.relpath(dest, ROOT))):
                broken.append(f"{f}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checks_catch_what_they_are_for():
    """The patterns above are the oracle: each must fire on the kind of line it is meant to refuse."""
    assert OUTSIDE.search("# the loss of SPEC §2") and OUTSIDE.search("see ../shared/NOTES-slurm.md")
    assert not OUTSIDE.search("output_dir=/shared/runs/base")  # a user's shared filesystem is fine
    assert REPO_PATH.findall("see docs/nothing-here.md and bench/gpu_call.sh") == ["docs/nothing-here.md",
                                                                                   "bench/gpu_call.sh"]
    assert REPO_PATH.findall("configs/pretrain/<size>.yaml, /data/configs/x.yaml") == []
    assert TOP_DOC.findall("as CONTRACTS.md says, README.md") == ["CONTRACTS.md", "README.md"]
    assert slug("Backends and `fcmae bench`") == "backends-and-fcmae-bench"
    assert slug("Representation probes (kNN monitor, `fcmae knn`, `fcmae embed`)") == \
        "representation-probes-knn-monitor-fcmae-knn-fcmae-embed"
