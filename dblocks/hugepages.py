"""glibc's malloc on transparent huge pages, for XLA on the CPU (imports nothing heavy: it runs before jax).

XLA's CPU runtime allocates each step's temporaries (1.7 GB for the CIFAR-100 ViT block step) and frees them after
the step; glibc's malloc gives allocations that large back to the kernel, and the next step faults every 4 KiB page
in again (about 450,000 page faults per step, a third of the step; docs/lab/performance.md "The C allocator").
glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 or newer) makes malloc ask for transparent huge pages
(madvise(MADV_HUGEPAGE)), so the same memory comes back in 2 MiB pages: about 100 times fewer faults measured
(450,000 -> 4,000 per step), the same peak RSS.

A tunable is read when the process starts, so `python -m experiments.<command>` re-executes itself once with it
(`experiments/__init__.py`, before anything else is imported), and `./launch.sh` exports it. Nothing is done when
another allocator is preloaded (tcmalloc, jemalloc, mimalloc), when the kernel's transparent huge pages are off
('never'), off Linux, when GLIBC_TUNABLES already sets the tunable, or with DBLOCKS_HUGEPAGES=0.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def thp_mode(path: str = _THP) -> str | None:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), None when it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _other_allocator(env) -> bool:
    return any(a in env.get("LD_PRELOAD", "") for a in _OTHER_ALLOCATORS)


def active(env=None) -> bool:
    """Whether GLIBC_TUNABLES asks glibc's malloc for huge pages (and no other allocator is preloaded)."""
    env = os.environ if env is None else env
    if _other_allocator(env):
        return False
    return f"{TUNABLE}=1" in env.get("GLIBC_TUNABLES", "").split(":")


def environ_with_hugepages(env=None, platform: str = sys.platform, thp: str | None = "read") -> dict | None:
    """`env` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None when there is nothing to do (see the
    module docstring for when)."""
    env = dict(os.environ if env is None else env)
    if not platform.startswith("linux") or env.get("DBLOCKS_HUGEPAGES", "1") == "0":
        return None
    if _other_allocator(env):
        return None
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if any(t.split("=", 1)[0] == TUNABLE for t in tunables):   # set (to anything) by the user: theirs stands
        return None
    if (thp_mode() if thp == "read" else thp) not in ("always", "madvise"):
        return None
    env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
    return env


def reexec_entry_point() -> None:
    """Re-executes `python [options] -m experiments.<command> ARGS` with the tunable, once. Does nothing unless this
    process is exactly such a command being started (sys.argv[0] is still '-m' while runpy imports the package)."""
    argv = list(getattr(sys, "orig_argv", []))
    if sys.argv[:1] != ["-m"] or "-m" not in argv[1:]:
        return
    i = argv.index("-m", 1)
    if i + 1 >= len(argv) or not argv[i + 1].startswith("experiments."):
        return
    env = environ_with_hugepages()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
