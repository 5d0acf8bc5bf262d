"""The compiled-memory report (compile only, nothing runs)."""
import json
import os
import subprocess
import sys

import pytest

from dblocks import memory
from dblocks.tasks import get_task
from experiments.configs import tiny_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_report_block_smaller_than_e2e():
    c = tiny_dit.get_config()
    c.model.num_layers, c.model.hidden = 6, 64
    c.data.batch_size = 32
    r = memory.memory_report(get_task(c))
    b, e = r["block"], r["e2e"]
    assert b["layers"] == 2 and e["layers"] == 6
    assert 0 < r["block_step_bytes"] < r["e2e_step_bytes"]
    assert 0 <= b["opt_state_bytes"] - 2 * b["params_bytes"] < 64  # Adam: two moments per parameter (+ counts)
    assert b["temp_bytes"] < e["temp_bytes"] and b["params_bytes"] < e["params_bytes"]
    assert r["ratio"] == r["block_step_bytes"] / r["e2e_step_bytes"]
    for row in memory.ROWS:                       # state + temporaries, and the FLOPs of the compiled step
        x = r[row]
        assert x["total_bytes"] == x["state_bytes"] + x["temp_bytes"] == r[f"{row}_step_bytes"]
        assert x["state_bytes"] >= x["params_bytes"] + x["opt_state_bytes"] and x["flops"] > 0
    # remat (scanned layers, policy 'full') keeps the state and cuts the temporaries; it recomputes the forward
    assert r["e2e_remat"]["params_bytes"] == e["params_bytes"]
    assert r["e2e_remat"]["temp_bytes"] < 0.8 * e["temp_bytes"]       # 6 layers (a 2-layer block gains ~nothing)
    assert r["e2e_remat"]["flops"] > e["flops"]
    assert r["block"]["flops"] < e["flops"]


@pytest.mark.slow
def test_memory_cli_json():
    proc = subprocess.run([sys.executable, "-m", "experiments.memory", "--config", "experiments/configs/tiny_dit.py",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["block_step_bytes"] < report["e2e_step_bytes"]
    assert report["block_remat_step_bytes"] < report["e2e_remat_step_bytes"]
