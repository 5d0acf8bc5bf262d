"""experiments.evaluate and experiments.compare on tiny configs: classification (ViT) and generation (DiT FID)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dblocks import assemble
from dblocks import train as train_lib
from dblocks.tasks import get_task
from experiments import compare as compare_lib
from experiments.configs import tiny_dit, tiny_vit
from dblocks.evaluation import evaluate_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_vit(steps=40):
    c = tiny_vit.get_config()
    c.train.steps, c.train.log_every, c.train.ckpt_every = steps, 20, steps
    return c


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("cmp_vit"))
    return wd, compare_lib.compare(_tiny_vit(), wd, {"limit": 256}, command="test")


def test_compare_writes_table_json_and_plots(compared):
    wd, result = compared
    for name in ("compare.md", "compare.json", "compare_loss.png", "compare_per_step.png", "dblocks/eval.json",
                 "e2e/eval.json"):
        assert os.path.exists(os.path.join(wd, name)), name
    table = open(os.path.join(wd, "compare.md")).read()
    for row in ("top1_accuracy", "training wall time", "compiled step memory", "inference block calls per sample"):
        assert row in table
    on_disk = json.load(open(os.path.join(wd, "compare.json")))
    d, e = on_disk["runs"]["dblocks"], on_disk["runs"]["e2e"]
    assert d["eval"]["block_calls_per_sample"] == 3 and e["eval"]["block_calls_per_sample"] == 1
    assert d["eval"]["layer_evals_per_sample"] == e["eval"]["layer_evals_per_sample"] == 3   # same inference compute
    assert d["train"]["seconds"] > 0 and e["train"]["seconds"] > 0
    assert set(d["steps_per_s"]) == {"block_00", "block_01", "block_02"} and set(e["steps_per_s"]) == {"e2e"}
    mem = on_disk["memory"]
    assert 0 < mem["block_step_bytes"] < mem["e2e_step_bytes"]
    assert f"| {d['eval']['headline']['value']:.4f} | {e['eval']['headline']['value']:.4f} |" in table


def test_both_methods_learn_the_synthetic_task(compared):
    _, result = compared
    for method in ("dblocks", "e2e"):   # 4 classes: chance is 0.25
        assert result["runs"][method]["eval"]["headline"]["value"] > 0.4, method


def test_classification_diagnostics(compared):
    wd, result = compared
    ev = result["runs"]["dblocks"]["eval"]
    assert ev["num_examples"] == 256
    assert len(ev["per_step"]["values"]) == 3 and ev["per_step"]["blocks"] == [0, 1, 2]
    assert ev["per_step"]["values"][-1] == pytest.approx(ev["headline"]["value"])
    # a block fed the true label with little noise is nearly always right; the highest-noise block is the hardest
    alone = ev["per_block"]["values"]
    assert alone[2] > 0.9 and alone[0] <= alone[2]
    assert "per_step" not in result["runs"]["e2e"]["eval"]
    more = evaluate_workdir(os.path.join(wd, "dblocks"), out=os.path.join(wd, "eval_10.json"), grid_points=10, limit=64)
    assert more["block_calls_per_sample"] == 10 and len(more["per_step"]["values"]) == 10
    assert more["options"] == {"grid_points": 10, "limit": 64} and os.path.exists(os.path.join(wd, "eval_10.json"))


def test_finished_runs_are_not_retrained(compared, monkeypatch):
    wd, result = compared
    monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    cfg = _tiny_vit()
    cfg.method = "e2e"
    assert compare_lib.train_timed(cfg, os.path.join(wd, "e2e")) == result["runs"]["e2e"]["train"]


def test_dit_fid_evaluation(tmp_path):
    """DiT.evaluate on an untrained run (initial parameters: FID is large but the protocol is what is tested)."""
    task = get_task(tiny_dit.get_config())
    units = task.units("dblocks")
    models = [task.make_model(u) for u in units]
    init = jax.jit(lambda m, k: task.init_params(m, k, task.dummy_batch()), static_argnums=0)
    params = [init(m, jax.random.PRNGKey(u.index)) for u, m in zip(units, models)]
    run = assemble.Run("", task.config, task, "dblocks", task.partition(), units, models, params, [{}] * 3)
    ev = task.evaluate(run, num_samples=24, repeats=2, batch_size=12, limit=100, grid_points=4,
                       cache_dir=str(tmp_path / "cache"), fid_train_steps=20)
    assert ev["headline"]["name"] == "fid_min_of_2" and not ev["headline"]["higher_is_better"]
    assert len(ev["fids"]) == 2 and ev["headline"]["value"] == min(ev["fids"]) and np.isfinite(ev["fids"]).all()
    assert ev["fids"][0] != ev["fids"][1]                     # independent sample sets
    assert ev["block_calls_per_sample"] == 4 and ev["seconds_per_image"] > 0 and ev["num_reference"] == 100
    assert os.path.exists(os.path.join(ev["feature_net"]["path"], "params.msgpack"))


@pytest.mark.slow
def test_command_lines(tmp_path):
    """The two entry points as a user runs them (fresh processes)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    wd = str(tmp_path / "cmp")
    subprocess.run([sys.executable, "-m", "experiments.compare", "--config", "experiments/configs/tiny_vit.py",
                    "--workdir", wd, "--limit", "64", "--config.train.steps=6"], cwd=ROOT, env=env, check=True)
    assert os.path.exists(os.path.join(wd, "compare.md"))
    out = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir", os.path.join(wd, "dblocks"),
                          "--grid_points", "5", "--opt", "bridge='renorm'", "--limit", "32"], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    ev = json.loads(out[out.index("{"):])
    assert ev["bridge"] == "renorm" and ev["block_calls_per_sample"] == 5
    bad = subprocess.run([sys.executable, "-m", "experiments.compare", "--config", "experiments/configs/tiny_vit.py",
                          "--workdir", wd, "--config.sample.grid_points=1"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "sample.grid_points=1" in bad.stderr


@pytest.mark.slow
def test_compare_trains_both_methods_before_evaluating_either(monkeypatch, tmp_path):
    """The text tasks score DiffusionBlocks samples under the e2e model: it must exist when the first evaluation
    runs. Training and evaluation are stubbed; the order of calls and the generation rows of the table are checked."""
    calls = []
    monkeypatch.setattr(compare_lib, "train_timed", lambda cfg, wd: calls.append(("train", cfg.method)) or
                        {"seconds": 1.0, "resumed": False})

    def fake_eval(wd, method, **options):
        calls.append(("eval", method, options["split"]))
        return {"headline": {"name": "bits_per_char", "value": 3.0 if method == "dblocks" else 2.5,
                             "higher_is_better": False}, "block_calls_per_sample": 3,
                "generation": {"gen_ppl": 9.5 if method == "dblocks" else 4.5, "distinct_1": 0.7,
                               "repetition_3": 0.01}}
    monkeypatch.setattr(compare_lib, "evaluate_workdir", fake_eval)
    result = compare_lib.compare(_tiny_vit(), str(tmp_path), {}, command="")
    assert calls == [("train", "dblocks"), ("train", "e2e"), ("eval", "dblocks", "validation"),
                     ("eval", "e2e", "validation")]   # settings are chosen on validation unless test is asked for
    table = compare_lib.markdown(result)
    assert "| perplexity of samples under the judge (a separate LM) | 9.5000 | 4.5000 |" in table
    assert "| samples: distinct-1 / repetition-3 | 0.700 / 0.010 | 0.700 / 0.010 |" in table


def _stub_compare(monkeypatch, calls):
    monkeypatch.setattr(compare_lib, "train_timed", lambda cfg, wd: calls.append(
        ("train", cfg.method, int(cfg.seed), os.path.basename(wd))) or {"seconds": 1.0, "resumed": False})

    def fake_eval(wd, method, **options):
        calls.append(("eval", os.path.basename(wd), options.get("e2e_workdir"), options["split"]))
        return {"headline": {"name": "bits", "value": 1.0, "higher_is_better": False}, "block_calls_per_token": 3}
    monkeypatch.setattr(compare_lib, "evaluate_workdir", fake_eval)
    unit = {"params_bytes": 1}
    monkeypatch.setattr(compare_lib.memory, "memory_report", lambda task: {   # no compile: only the calls matter
        "block_step_bytes": 1, "e2e_step_bytes": 3, "block": unit, "e2e": unit, "batch_size": 1, "ratio": 1 / 3})


def test_a_missing_validation_split_is_refused_before_anything_trains(monkeypatch, tmp_path):
    from dblocks import data as data_lib
    np.savez(tmp_path / "a.npz", image=np.zeros((40, 8, 8, 1), np.uint8), label=np.arange(40) % 4)
    c = _tiny_vit()
    c.data.name = f"npz:{tmp_path / 'a.npz'}"
    with c.unlocked():
        c.data.val_fraction = 0.0
    calls = []
    _stub_compare(monkeypatch, calls)
    with pytest.raises(data_lib.DataError, match="no validation split of its own and data.val_fraction=0"):
        compare_lib.compare(c, str(tmp_path / "cmp"), {}, command="")
    assert calls == []


def test_generated_text_is_judged_by_neither_contestant(monkeypatch, tmp_path):
    from experiments.configs import tiny_ar
    c = tiny_ar.get_config()
    calls = []
    _stub_compare(monkeypatch, calls)
    compare_lib.compare(c, str(tmp_path), {"references": False}, command="")
    judge = os.path.join(str(tmp_path), "judge")
    assert ("train", "e2e", int(c.seed) + compare_lib.JUDGE_SEED_OFFSET, "judge") in calls
    assert [x for x in calls if x[0] == "eval"] == [("eval", "dblocks", judge, "validation"),
                                                    ("eval", "e2e", judge, "validation")]
