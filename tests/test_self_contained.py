"""The repository stands on its own: no tracked file points at files a user of the repository does not have, and
every `docs/<name>.md` or `docs/lab/<name>.md` a tracked file cites exists. Fast, no jax."""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Built by concatenation so that this file does not match its own needles.
NEEDLES = (".." + "/shared", "shared" + "/reference", "DESIGN" + ".md", "pitfalls" + ".md")
DOC_CITATION = re.compile(r"\bdocs/((?:lab/)?[A-Za-z0-9_.-]+\.md)\b")


def tracked_texts() -> dict[str, str]:
    """{path: text} of every git-tracked file that exists and decodes as UTF-8 text (binary files are skipped)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    texts = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def outside_references(texts: dict[str, str]) -> list[str]:
    """'path:line: needle' for every mention of a file outside the repository."""
    hits = []
    for name, text in texts.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            hits += [f"{name}:{lineno}: {needle}" for needle in NEEDLES if needle in line]
    return hits


def missing_doc_citations(texts: dict[str, str]) -> list[str]:
    """'path:line: citation' for every cited doc (docs/ + a name ending in .md) missing from the working tree."""
    missing = []
    for name, text in texts.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            missing += [f"{name}:{lineno}: docs/{doc}" for doc in DOC_CITATION.findall(line)
                        if not (ROOT / "docs" / doc).is_file()]
    return missing


def test_no_tracked_file_refers_outside_the_repository():
    hits = outside_references(tracked_texts())
    assert not hits, ("files outside the repository are cited; cite docs/design.md or docs/method.md instead:\n"
                      + "\n".join(hits))


def test_every_cited_doc_exists():
    missing = missing_doc_citations(tracked_texts())
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)


def test_the_checks_catch_what_they_guard():
    """The scanners on made-up files: a needle is found, a clean line is not, a missing doc is reported."""
    texts = {"a.py": "x = 1\n# see " + NEEDLES[0] + "/x\n",
             "b.md": "cite docs/design.md and docs/" + "no_such_doc.md\n",
             "c.md": "cite docs/lab/" + "no_such_study.md\n"}
    assert outside_references(texts) == ["a.py:2: " + NEEDLES[0]]
    assert missing_doc_citations(texts) == ["b.md:1: docs/" + "no_such_doc.md",
                                            "c.md:1: docs/lab/" + "no_such_study.md"]
