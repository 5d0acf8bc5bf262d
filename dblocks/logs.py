"""Progress lines, a JSON-lines metrics file a person can plot, TensorBoard event files beside it, and the loss-curve
plot.

WORKDIR/metrics.jsonl is the record of a run. When tensorboardX is installed (no TensorFlow needed), the same records
also go to TensorBoard event files in WORKDIR, one scalar per numeric field, tagged "<unit>/<field>" (block_00/loss,
block_00/lr, e2e/examples_per_s, ...): `tensorboard --logdir WORKDIR` (or the parent of several workdirs)."""
from __future__ import annotations

import atexit
import json
import os
import secrets
import time

import logging
import sys

import jax
import numpy as np

from dblocks import profiling

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("dblocks")


def setup(level: int = logging.INFO) -> None:
    """dblocks' progress lines on stdout; the libraries' INFO chatter (orbax logs every save) silenced."""
    from absl import flags as absl_flags
    from absl import logging as absl_logging
    given = "verbosity" in absl_flags.FLAGS and absl_flags.FLAGS["verbosity"].present
    if not given:   # a user's -v / --verbosity wins
        absl_logging.set_verbosity(absl_logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _plain(v):
    return float(v) if isinstance(v, (np.floating, np.integer)) or hasattr(v, "dtype") else v


class MetricsWriter:
    """Appends {'unit', 'step', ...} records to WORKDIR/metrics.jsonl and, when tensorboardX is installed and
    `tensorboard` is true, writes every numeric field as the TensorBoard scalar "<unit>/<field>" at `step`
    (process 0 only)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = bool(workdir) and jax.process_index() == 0
        self.tensorboard = tensorboard and self.enabled
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict) -> None:
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)")
                self.tensorboard = False
                return
            # tensorboardX names the file by time (seconds) and host: two jobs of one host starting in the same
            # second (blocks trained as separate jobs) would write into one file; pid and a random tag make it unique
            suffix = f".{os.getpid()}.{secrets.token_hex(4)}"
            self._tb = SummaryWriter(self.workdir, flush_secs=10, filename_suffix=suffix)
            atexit.register(self.close)   # events are queued to a writer thread: close() writes them all
        unit, step = str(record.get("label", record.get("unit", "run"))), int(record.get("step", 0))
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{unit}/{k}", float(v), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A progress line every `every` steps: step, loss, steps/s, ETA (compile time excluded from the rate)."""

    def __init__(self, label: str, start: int, total: int, every: int):
        self.label, self.total, self.every = label, total, every
        self.t_mark, self.s_mark = None, start
        self.flops_per_step, self.peak_flops = 0.0, None   # set by the loop (dblocks.profiling.step_cost)

    def start_clock(self, step: int) -> None:
        """Call once the first step of this process has been dispatched (it compiles): the rate excludes it."""
        self.t_mark, self.s_mark = time.perf_counter(), step

    def update(self, step: int, metrics: dict) -> dict | None:
        """Call after `step` steps are done; logs and returns a record every `every` steps and at the end."""
        now = time.perf_counter()
        if step % self.every and step != self.total:
            return None
        if self.t_mark is None:
            self.t_mark, self.s_mark = now, step
        rate = (step - self.s_mark) / (now - self.t_mark) if step > self.s_mark else float("nan")
        eta = (self.total - step) / rate if rate and np.isfinite(rate) and rate > 0 else float("nan")
        vals = {k: float(v) for k, v in metrics.items()}
        extra = "  ".join(f"{k} {v:.4g}" for k, v in vals.items() if k != "loss")
        speed = profiling.throughput(self.flops_per_step, rate, self.peak_flops)   # FLOP/s and MFU
        log.info("[%s] step %d/%d  loss %.4f  %s  %.2f steps/s%s  ETA %s", self.label, step, self.total,
                     vals.get("loss", float("nan")), extra, rate, profiling.describe(speed),
                     fmt_duration(eta) if np.isfinite(eta) else "?")
        return {"steps_per_s": rate, **vals, **speed}


def read_metrics(workdir: str) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl. A line that is not a whole JSON object (a process killed while
    appending leaves a partial line, which the next record may continue) is skipped with a warning."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records, bad = [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        log.warning("%s: skipped %d damaged line(s) (%s), e.g. a write cut short by a kill", path, len(bad),
                    ", ".join(map(str, bad[:5])))
    return records


def plot_losses(workdir: str, out: str | None = None, records: list[dict] | None = None) -> str | None:
    """Loss per step for every unit in the metrics file -> WORKDIR/loss.png. Returns the path (None if empty)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir) if records is None else records
    by_unit: dict[str, dict[int, float]] = {}
    for r in records:
        if "loss" in r and "step" in r:
            by_unit.setdefault(r.get("label", r["unit"]), {})[int(r["step"])] = r["loss"]  # resumes: last wins
    if not by_unit:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for unit, curve in sorted(by_unit.items()):
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], label=unit)
    ax.set_xlabel("step (per unit)")
    ax.set_ylabel("training loss (mean over each log interval)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = out or os.path.join(workdir, "loss.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
