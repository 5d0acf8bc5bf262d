"""Conversion of an end-to-end run into blocks: block b's layers are the e2e layers of its slice, the embedders and
head are copies, missing conditioning starts switched off, and the converted workdir trains as any block run."""
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from dblocks import assemble, convert
from dblocks import train as train_lib
from dblocks.tasks import get_task
from experiments.lab import convert_curve
from experiments.configs import tiny_ar, tiny_dit, tiny_mdm, tiny_vit


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def random_e2e(config):
    """Random non-zero e2e parameters (LayerNorm scales != 1, so the AdaLN mapping is visible)."""
    config = config.copy_and_resolve_references()
    config.method = "e2e"
    task = get_task(config)
    unit = task.units("e2e")[0]
    params = task.init_params(task.make_model(unit), jax.random.PRNGKey(0), task.dummy_batch(2))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return unit.num_layers, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in
                                                      zip(leaves, keys)])


def converted(config, tmp_path, name):
    layers, e2e = random_e2e(config)
    c = config.copy_and_resolve_references()
    c.method = "dblocks"
    summary = convert.write_blocks(c, e2e, str(tmp_path / name), "e2e")
    run = assemble.load_run(str(tmp_path / name), allow_incomplete=True, use_ema=False)
    return flat(e2e), [flat(p) for p in run.params], run, summary


@pytest.mark.parametrize("cfg", [tiny_dit, pytest.param(tiny_mdm, marks=pytest.mark.slow),
                                 pytest.param(tiny_ar, marks=pytest.mark.slow)])
def test_same_architecture_blocks_are_the_e2e_slices(cfg, tmp_path):
    e2e, blocks, run, summary = converted(cfg.get_config(), tmp_path, "conv")
    offset = 0
    for b, (p, unit) in enumerate(zip(blocks, run.units)):
        for path, v in p.items():
            src = convert._shift_layer(path, offset)
            if src in e2e:
                np.testing.assert_array_equal(v, e2e[src], err_msg=f"block {b} {path} <- {src}")
            else:                                   # a module the e2e model lacks (the AR's noisy-input projection)
                assert path in summary["blocks"][b]["zeros"] and not v.any(), path
        assert any(k.startswith("layer_") or "/layer_" in k for k in p)
        offset += unit.num_layers
    assert offset == sum(u.num_layers for u in run.units)


def test_vit_classifier_maps_onto_the_denoiser_with_conditioning_off(tmp_path):
    e2e, blocks, run, summary = converted(tiny_vit.get_config(), tmp_path, "conv")
    offset = 0
    for p, unit in zip(blocks, run.units):
        for j in range(unit.num_layers):
            src, dst = f"layer_{offset + j}/", f"layer_{j}/"
            for k in ("Attention_0/Dense_0/kernel", "Attention_0/Dense_1/bias"):
                np.testing.assert_array_equal(p[dst + k], e2e[src + k])
            np.testing.assert_array_equal(p[dst + "Dense_1/kernel"], e2e[src + "Dense_0/kernel"])   # MLP in
            np.testing.assert_array_equal(p[dst + "Dense_2/kernel"], e2e[src + "Dense_1/kernel"])   # MLP out
            assert not p[dst + "Dense_0/kernel"].any()                                               # AdaLN off
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = np.split(p[dst + "Dense_0/bias"], 6)
            np.testing.assert_allclose(scale_a, e2e[src + "LayerNorm_0/scale"] - 1, rtol=1e-6)
            np.testing.assert_array_equal(shift_m, e2e[src + "LayerNorm_1/bias"])
            assert np.all(gate_a == 1) and np.all(gate_m == 1)
        np.testing.assert_array_equal(p["head/Dense_1/kernel"], e2e["head/kernel"])
        np.testing.assert_array_equal(p["label_pos"], e2e["cls"])
        np.testing.assert_array_equal(p["patch_embed/proj/kernel"], e2e["patch_embed/proj/kernel"])
        assert not p["label_in/kernel"].any() and not p["head/Dense_0/kernel"].any()
        assert p["NoiseEmbedder_0/Dense_0/kernel"].any()          # kept at init: the modulation can learn
        offset += unit.num_layers


@pytest.mark.slow
def test_convert_a_trained_e2e_workdir_then_train_the_blocks(tmp_path):
    c = tiny_dit.get_config()
    c.method, c.train.steps, c.train.ckpt_every, c.train.keep_checkpoints = "e2e", 3, 1, 6
    train_lib.train(c, str(tmp_path / "e2e"))
    summary = convert.convert(str(tmp_path / "e2e"), str(tmp_path / "blocks"))
    assert [b["layers"] for b in summary["blocks"]] == [[0, 1], [1, 2], [2, 3]]
    e2e = flat(assemble.load_run(str(tmp_path / "e2e"), method="e2e").params[0])   # the EMA weights are converted
    start = [flat(p) for p in assemble.load_run(str(tmp_path / "blocks"), allow_incomplete=True,
                                                use_ema=False).params]
    np.testing.assert_array_equal(start[2]["layer_0/Dense_1/kernel"], e2e["layer_2/Dense_1/kernel"])
    cb = assemble.load_config(str(tmp_path / "blocks"))         # the e2e config, method dblocks
    train_lib.train(cb, str(tmp_path / "blocks"))
    run = assemble.load_run(str(tmp_path / "blocks"), use_ema=False)
    for b, p in enumerate(run.params):
        meta = json.load(open(os.path.join(tmp_path, "blocks", run.units[b].subdir(), "meta.json")))
        assert meta["complete"] and meta["step"] == 3
        moved = flat(p)["layer_0/Dense_1/kernel"] - start[b]["layer_0/Dense_1/kernel"]
        assert np.abs(moved).max() > 0                                         # it trained from the converted start
    with pytest.raises(convert.ConversionError, match="exists"):
        convert.convert(str(tmp_path / "e2e"), str(tmp_path / "blocks"))
    # the conversion curve reads each kept step: step 0 is the converted start, the last one the trained blocks
    at0, at3 = (convert_curve.load_at(str(tmp_path / "blocks"), s) for s in (0, 3))
    for b in range(3):
        np.testing.assert_array_equal(flat(at0.params[b])["layer_0/Dense_1/kernel"], start[b]["layer_0/Dense_1/kernel"])
        np.testing.assert_array_equal(flat(at3.params[b])["layer_0/Dense_1/kernel"],
                                      flat(run.params[b])["layer_0/Dense_1/kernel"])
    with pytest.raises(ValueError, match="no checkpoint at step 5"):
        convert_curve.load_at(str(tmp_path / "blocks"), 5)


def test_convert_curve_summary_and_checkpoint_overrides():
    assert convert_curve.eval_steps_for(1200, [0, 0.125, 0.25, 0.5, 1]) == [0, 150, 300, 600, 1200]
    assert convert_curve.train_overrides(1200, [0, 150, 300, 600, 1200], []) == [
        "--config.train.steps=1200", "--config.train.ckpt_every=150", "--config.train.keep_checkpoints=10"]
    row = lambda s, v: {"step": s, "value": v, "higher_is_better": True}  # noqa: E731
    res = {"steps": 8, "arms": {"conv": [row(0, 0.5), row(2, 0.7), row(4, 0.8), row(8, 0.85)],
                                "scratch": [row(0, 0.1), row(4, 0.6), row(8, 0.8)]}}
    s = convert_curve.summarise(res)
    assert s["conv_steps_to_scratch_full"] == 4 and s["criterion_met"] and s["conv_best_within_half"] == 0.8
    res["arms"]["scratch"][-1] = row(8, 0.82)        # scratch better than conv at half: short by 0.02
    s = convert_curve.summarise(res)
    assert s["conv_steps_to_scratch_full"] == 8 and not s["criterion_met"] and s["shortfall_at_half"] == 0.02
    lower = {"steps": 8, "arms": {a: [dict(r, higher_is_better=False) for r in rs] for a, rs in res["arms"].items()}}
    assert convert_curve.summarise(lower)["conv_steps_to_scratch_full"] == 0     # FID: lower is better
