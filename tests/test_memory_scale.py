"""The memory-at-scale sweep (dblocks.memory_scale): parameter counts of the scaled models, and block rows that are
really blocks. Compile only, tiny sizes."""
import jax
import pytest

from dblocks import memory_scale as ms
from dblocks import steps
from experiments.configs import cifar10_dit, lm1b_ar

TINY = ms.Size(hidden=32, layers=4, heads=2)
VOCAB = 512


@pytest.mark.parametrize("get_config, vocab", [(cifar10_dit.get_config, None), (lm1b_ar.get_config, VOCAB)])
def test_claimed_params_are_the_parameter_trees(get_config, vocab):
    """The count the sweep picks its sizes by is the count of the tree it compiles, for e2e and a block (which has
    its own embedders and head, and in the LM its own target-space input and previous-token table)."""
    config = ms.scaled_config(get_config(), TINY, num_blocks=2, batch_size=2)
    task = ms.scaled_task(config, vocab)
    for unit in (task.units("e2e")[0], task.units("dblocks")[0]):
        model = task.make_model(unit)
        params = jax.eval_shape(lambda: task.init_params(model, steps.init_key(0, unit.index), task.dummy_batch(2)))
        assert ms.param_count(params) == ms.claimed_params(config, unit.num_layers, unit.is_block, vocab)
    assert unit.num_layers == TINY.layers // 2


def test_size_report_block_rows_are_blocks():
    """With 2 blocks the block step is a 2-layer network of its own: its row names a block, counts a block's
    parameters and costs less than the 4-layer end-to-end step (ratio < 1). Built from the e2e unit, the row would
    say 'e2e', 4 layers, the e2e count, and a ratio of 1."""
    base = cifar10_dit.get_config()
    r = ms.size_report(base, TINY, blocks=(2,), variants={"_remat": ms.REMAT}, batch_size=4)
    e2e, block = r["e2e_remat"], r["blocks"]["2"]["block_remat"]
    config = ms.scaled_config(base, TINY, num_blocks=2)
    assert (e2e["unit"], e2e["layers"]) == ("e2e", 4)
    assert (block["unit"], block["layers"]) == ("block_00", 2)
    assert block["params"] == ms.claimed_params(config, 2, True) < e2e["params"] == r["params"]
    assert 0 < r["blocks"]["2"]["ratio_remat"] == block["total_bytes"] / e2e["total_bytes"] < 1
    for row in (e2e, block):   # Adam's two moments sit in the state, apart from the temporaries
        assert row["total_bytes"] == row["state_bytes"] + row["temp_bytes"]
        assert row["state_bytes"] >= row["params_bytes"] + row["opt_state_bytes"] >= 3 * row["params_bytes"]


def test_size_report_adds_only_missing_rows(monkeypatch):
    """A report passed back as `done` keeps its rows and compiles only what it lacks (a new variant or B is added
    to the files of an earlier sweep): here the chunked variant at B = 2, two compiles, and the remat rows are the
    earlier ones. Recompiling the kept rows would call unit_row four times."""
    base = cifar10_dit.get_config()
    done = {"family": "dit", "hidden": TINY.hidden, "layers": TINY.layers, "heads": TINY.heads, "batch_size": 4,
            "vocab_size": None, "params": 1,
            "e2e_remat": {"total_bytes": 100, "params": 1},
            "blocks": {"2": {"block_remat": {"total_bytes": 40}, "ratio_remat": 0.4}}}
    compiled = []

    def fake_row(task, unit, batch_size):
        compiled.append((unit.name, task.config.model.layer_chunk))
        return {"unit": unit.name, "total_bytes": 50 if unit.is_block else 200, "params": 2}

    monkeypatch.setattr(ms, "unit_row", fake_row)
    variants = {"_remat": ms.REMAT, "_remat_chunked": ms.REMAT_CHUNKED}
    r = ms.size_report(base, TINY, blocks=(2,), variants=variants, batch_size=4, done=done)
    assert compiled == [("e2e", ms.LAYER_CHUNK), ("block_00", ms.LAYER_CHUNK)]
    assert r["e2e_remat"] == done["e2e_remat"] and r["blocks"]["2"]["ratio_remat"] == 0.4
    assert r["blocks"]["2"]["ratio_remat_chunked"] == 0.25
    assert "ratio_remat_chunked" not in done["blocks"]["2"]   # the caller's report is not changed
    with pytest.raises(ValueError, match="another size"):
        ms.size_report(base, ms.Size(64, 4, 2), blocks=(2,), variants=variants, batch_size=4, done=done)
