"""Process set-up for every entry point: the persistent compilation cache and a log line of what JAX runs on.

  runtime.setup()        enable the cache (once per process) and log backend, devices, jax version and the C
                         allocator; warns when a GPU is visible but JAX runs on the CPU (a CPU-only jax install)
  runtime.allocator()    which malloc this process runs on ('tcmalloc', 'jemalloc', 'glibc', ...)
  runtime.split_cpu(n)   split the host CPU into n JAX devices (before the backend starts; config.parallel.cpu_devices)

On the CPU backend the allocator matters (docs/lab/performance.md "The C allocator"): XLA frees its temporaries after
every step, glibc's malloc hands the large ones back to the kernel, and the next step faults every page in again
(about 460,000 page faults per CIFAR-100 ViT block step). On transparent huge pages (glibc.malloc.hugetlb=1, set by
the entry points and launch.sh: dblocks/hugepages.py) the pages come back 2 MiB at a time (about 100x fewer
faults), at the same peak RSS.
tcmalloc keeps them instead, at up to 1.8x the peak RSS: `DBLOCKS_MALLOC=tcmalloc ./launch.sh ...` (opt-in).

The cache directory is $DBLOCKS_CACHE (or $JAX_COMPILATION_CACHE_DIR), else ~/.cache/dblocks/jax; DBLOCKS_CACHE=off
(or 0, none) turns it and every other dblocks cache off (`artifact_cache_dir`). It is on by default on GPU and TPU;
on the CPU backend only when DBLOCKS_CACHE names a directory (a cached CPU executable's results differ from a fresh
compile's by ~1e-8, which would break bit-identical resumes).
Compiled programs are reused across processes: a resumed run, each job of a one-job-per-block run,
evaluate / sample / compare re-runs. The cache holds executable code: keep it per user, never on a shared bucket.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp

from dblocks import hugepages

log = logging.getLogger("dblocks")
_done: dict = {}


CACHE_OFF = ("off", "0", "none")


def cache_dir() -> str | None:
    """The compilation cache directory to use, or None when turned off."""
    d = os.environ.get("DBLOCKS_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dblocks", "jax")
    return None if d.lower() in (*CACHE_OFF, "") else d


def artifact_cache_dir() -> str | None:
    """Where dblocks keeps what it derives once and reuses (e.g. the FID feature network): $DBLOCKS_CACHE, else
    ~/.cache/dblocks; None when DBLOCKS_CACHE=off (every dblocks cache off: nothing is stored, a folder named
    'off' is never made)."""
    d = os.environ.get("DBLOCKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dblocks")
    return None if d.lower() in CACHE_OFF else d


def enable_compilation_cache(path: str | None = None, min_compile_seconds: float = 1.0) -> str | None:
    """Turns on JAX's persistent compilation cache at `path` (default: cache_dir()). Programs that compile in under
    `min_compile_seconds` are not stored. Returns the directory, or None when off or not writable."""
    path = cache_dir() if path is None else path
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (device node or a working nvidia-smi), whatever JAX uses."""
    if os.path.exists("/dev/nvidia0"):
        return True
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def allocator(maps: str | None = None) -> str:
    """The C allocator of this process, read from its memory map (/proc/self/maps, or `maps` given as text):
    'tcmalloc' or 'jemalloc' when one is loaded (LD_PRELOAD), else 'glibc' on Linux, 'system' elsewhere."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return "system"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if "libc.so" in maps else "system"


def device_info() -> dict:
    """Backend, device kinds and counts, jax / jaxlib versions."""
    import jaxlib
    devs = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devs[0].device_kind if devs else "",
            "devices": len(devs), "local_devices": jax.local_device_count(), "processes": jax.process_count(),
            "jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"), "allocator": allocator(),
            "huge_pages": hugepages.active()}


def log_devices() -> dict:
    """Logs device_info() and warns when a GPU is visible but the backend is CPU. Returns the info."""
    info = device_info()
    huge = info["allocator"] == "glibc" and info["huge_pages"]
    log.info("jax %s on %s: %d device(s) (%s), %d process(es), allocator %s%s", info["jax"], info["backend"],
             info["devices"], info["device_kind"], info["processes"], info["allocator"],
             " on transparent huge pages (glibc.malloc.hugetlb=1)" if huge else "")
    if info["backend"] == "cpu" and info["allocator"] == "glibc" and not huge:
        log.info("glibc malloc re-faults XLA's temporaries in 4 KiB pages every step on the CPU: "
                 "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (what `python -m experiments.*` and launch.sh set unless "
                 "DBLOCKS_HUGEPAGES=0 or the kernel's transparent huge pages are off) runs steps about 1.5x faster "
                 "at the same peak RSS (docs/lab/performance.md)")
    if info["backend"] == "cpu" and gpu_visible():
        log.warning("a GPU is visible but JAX runs on the CPU: install the CUDA build of jax "
                    "(pip install 'jax[cuda12]==%s') to use it", info["jax"])
    return info


def setup(cache: bool = True) -> dict:
    """Once per process: the compilation cache (logged) and the device log line. Returns device_info() plus
    'compilation_cache' (the directory or None)."""
    if "info" in _done:
        return _done["info"]
    explicit = bool(os.environ.get("DBLOCKS_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    if cache and jax.default_backend() == "cpu" and not explicit:
        # On the CPU backend an executable loaded from the cache gives results that differ from a fresh compile
        # by ~1e-8, which breaks the bit-identical resume (and block-alone == all-blocks) of CLI runs, and CPU
        # compiles are short: the cache is off there unless DBLOCKS_CACHE names a directory.
        cache = False
        log.info("compilation cache: off on the CPU backend (DBLOCKS_CACHE=DIR turns it on)")
    path = enable_compilation_cache() if cache else None
    if cache:
        log.info("compilation cache: %s", path or "off")
    info = {**log_devices(), "compilation_cache": path}
    _done["info"] = info
    return info


def split_cpu(n: int) -> bool:
    """Makes the CPU backend n devices (jax_num_cpu_devices, overriding --xla_force_host_platform_device_count).
    XLA's CPU runtime runs a step's matmuls on every core but its elementwise fusions and transposes on one;
    a batch split over n host devices runs those on n cores (docs/lab/performance.md "Two CPU devices"). Must run
    before anything starts a backend; returns False (and changes nothing) when n <= 1 or a backend already runs,
    in which case the devices that exist are used."""
    if not isinstance(n, int) or n <= 1:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:   # a backend is already up (a test, a notebook): keep its devices
        return False
    return True


def matmul_rate(n: int | None = None, dtype=jnp.float32, repeats: int = 5) -> dict:
    """GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in XLA on the default device: the best of `repeats`."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": jnp.dtype(dtype).name, "gflops": 2 * n ** 3 / best / 1e9}
