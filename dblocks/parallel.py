"""Block-parallel training on a device mesh with axes ('block', 'data') (docs/design.md item 9).

Blocks of one shape train at once: their train states are stacked on a leading axis sharded over 'block', and one
jitted step, vmapped over that axis, trains all of them. Each block's batch [bs, ...] is sharded over 'data', so XLA's
partitioner averages the block's gradients over its own 'data' group; nothing in the step reads another block's
arrays, so no collective crosses 'block' (tests/test_parallel.py reads the compiled HLO to prove it).

Block b draws its randomness from fold_in(fold_in(fold_in(seed, b), 1), step) and trains on Trainer.batch(b, step),
exactly as the sequential engine does (both build their steps from dblocks.steps and run the same loop,
dblocks.loop), so both modes end with the same parameters to float tolerance and log the same interval means. Each block
is saved to its own Orbax directory in the sequential engine's format, so assembly, sampling and resuming do not care
which mode trained it (a block begun sequentially can be finished on the mesh and the other way round).

Multi-host: every process runs the same program after `init_distributed`; each loads only the part of the batch its
devices hold (`jax.make_array_from_process_local_data`); all processes take part in Orbax saves (Orbax writes each
shard once); only process 0 logs and writes meta, metrics and config.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dblocks import engine, logs, loop, steps, validation
from dblocks.config import ConfigError, parse_blocks
from dblocks.tasks import Unit

BLOCK, DATA = "block", "data"
State = steps.State


# -- processes and the mesh ---------------------------------------------------------------------------------------

def init_distributed(enabled: bool = False) -> bool:
    """Calls jax.distributed.initialize() when `enabled` (--multihost) or when JAX_COORDINATOR_ADDRESS and
    JAX_NUM_PROCESSES are set (then JAX_PROCESS_ID gives the rank). On Cloud TPU pods, SLURM and Open MPI jax finds
    all three by itself. Must run before anything touches a device. Returns whether it initialised."""
    env = os.environ
    if not (enabled or (env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"))):
        return False
    kw = {k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
          if env.get(v)}
    jax.distributed.initialize(**kw)  # coordinator: JAX_COORDINATOR_ADDRESS or the cluster's own
    return True


def auto_mode(config) -> tuple[str, str]:
    """What parallel.mode='auto' (the default) means on this machine: ('mesh' | 'sequential', why). Several
    accelerators and several blocks to train: the blocks train side by side on a mesh of all devices. A CPU's
    devices stay sequential: forced host devices (XLA_FLAGS, parallel.cpu_devices) share the same cores."""
    n, backend = jax.device_count(), jax.default_backend()
    units = 1 if config.method == "e2e" else len(parse_blocks(config.blocks.train, int(config.blocks.num_blocks)))
    if jax.process_count() > 1:
        return "mesh", f"{jax.process_count()} processes train one mesh"
    if n < 2:
        return "sequential", "one device"
    if backend == "cpu":
        return "sequential", (f"the {n} devices are host CPU devices that share the same cores, not separate "
                              f"accelerators; --config.parallel.cpu_devices=N splits each step's batch over N of "
                              f"them, --config.parallel.mode=mesh trains blocks side by side on them")
    if units < 2:
        what = "the end-to-end network" if config.method == "e2e" else "one block"
        return "sequential", (f"one unit to train ({what}), on 1 of the {n} devices: --config.parallel.mode=mesh "
                              f"--config.parallel.data={n} splits its batch over all of them")
    return "mesh", f"{units} blocks to train on {n} {backend} devices"


def requested_mode(config) -> str:
    """config.parallel.mode with 'auto' resolved (absent in configs saved before it existed: sequential)."""
    mode = str(config.parallel.mode)
    return auto_mode(config)[0] if mode == "auto" else mode


def device_plan(config) -> str:
    """One start-up log line: the devices visible, the mode (and for 'auto', why), and the devices that train."""
    devices, asked = jax.devices(), str(config.parallel.mode)
    mode = settings(config)[0]
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    line = f"{len(devices)} {jax.default_backend()} device(s) visible ({kinds}); parallel.mode={asked}"
    if asked == "auto":
        line += f" -> {requested_mode(config)} ({auto_mode(config)[1]})"
    used = "the mesh's devices (below)" if mode == "mesh" else str(jax.local_devices()[0])
    return f"{line}; training on {used}"


def settings(config) -> tuple[str, int, int]:
    """(mode, data axis size, block axis size; 0 = as many as fit) from config.parallel (absent: sequential;
    'auto': auto_mode). A sequential run with parallel.cpu_devices = n > 1 on the CPU backend is a mesh of 1 block x
    n data devices: the same units one after another, each step's batch split over the host's n CPU devices."""
    p = config.parallel
    mode, data, blocks, cpus = requested_mode(config), int(p.data), int(p.blocks), int(p.cpu_devices)
    if mode == "sequential" and cpus > 1 and jax.default_backend() == "cpu":
        return "mesh", cpus, 1
    return mode, data, blocks


def mesh_shape(config, group_size: int) -> tuple[int, int]:
    """(blocks, data) of the mesh for groups of up to `group_size` same-shape units; ConfigError if it cannot fit.
    A multi-process mesh spans every device (each process must take part in every step)."""
    mode, data, blocks = settings(config)
    n, procs = jax.device_count(), jax.process_count()
    if data > n:
        what = "parallel.data" if requested_mode(config) == mode else "parallel.cpu_devices"
        raise ConfigError(f"{what}={data} exceeds the {n} devices")
    if blocks == 0:
        blocks = n // data if procs > 1 else min(n // data, group_size)
    if blocks * data > n:
        raise ConfigError(f"parallel.blocks={blocks} x parallel.data={data} needs {blocks * data} devices; "
                          f"there are {n}")
    if procs > 1 and blocks * data != n:
        raise ConfigError(f"with {procs} processes the mesh must span all {n} devices: parallel.blocks x "
                          f"parallel.data = {blocks} x {data}")
    if int(config.data.batch_size) % data:
        raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by parallel.data={data}")
    return blocks, data


def make_mesh(blocks: int, data: int, devices: list | None = None) -> Mesh:
    """A ('block', 'data') mesh on the first blocks*data devices; a block's data group is a row (neighbours)."""
    devices = list(jax.devices() if devices is None else devices)
    n = blocks * data
    types = (AxisType.Auto, AxisType.Auto)
    if n == len(devices):
        return jax.make_mesh((blocks, data), (BLOCK, DATA), axis_types=types, devices=devices)
    return Mesh(np.array(devices[:n]).reshape(blocks, data), (BLOCK, DATA), axis_types=types)


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (block) axis over 'block', replicated over 'data': states, keys, ranges, metrics."""
    return NamedSharding(mesh, P(BLOCK))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[blocks, per-block batch, ...] over ('block', 'data')."""
    return NamedSharding(mesh, P(BLOCK, DATA))


# -- the step -----------------------------------------------------------------------------------------------------

def make_parallel_step(trainer: engine.Trainer, model, mesh: Mesh) -> Callable:
    """step(state [K, ...], batch [K, bs, ...], base_keys [K, 2], train_ranges [K, 2]) -> (state, metrics [K]).

    Block k runs the plain single-unit step (steps.make_train_step: its rng is fold_in(base_keys[k], step), the
    sequential engine's sequence). The step is manual over 'block' (jax.shard_map): each block group runs the step on
    its own slice, vmapped over the blocks it holds (a squeeze when it holds one), so nothing can move between
    blocks; it is automatic over 'data', so XLA splits each block's batch over its data group and all-reduces the
    gradients inside that group. (A vmapped step partitioned automatically over both axes is not safe: XLA
    all-gathers the activations of a vmapped convolution's weight gradient across every device.)"""
    one_block = trainer.train_step(model)

    def local_blocks(*args):  # the blocks of one block group: leading axis mesh.shape['block'] times fewer
        if jax.tree.leaves(args)[0].shape[0] == 1:
            out = one_block(*jax.tree.map(lambda x: x[0], args))
            return jax.tree.map(lambda x: x[None], out)
        return jax.vmap(one_block)(*args)

    st, bt = stacked_sharding(mesh), batch_sharding(mesh)
    # check_vma=False: nothing in the step communicates over 'block', and with the check on, lax.switch inside a
    # vmap (RandAugment's per-image op) failed to trace ("pvary is a invariant->variant collective")
    mapped = jax.shard_map(local_blocks, mesh=mesh, in_specs=P(BLOCK), out_specs=P(BLOCK), axis_names={BLOCK},
                           check_vma=False)
    return jax.jit(mapped, in_shardings=(st, bt, st, st), out_shardings=(st, st), donate_argnums=0)


def abstract_args(trainer: engine.Trainer, unit: Unit, model, mesh: Mesh, batch_size: int | None = None) -> tuple:
    """ShapeDtypeStructs of the parallel step's arguments, to lower and compile it without data (HLO, memory)."""
    k = mesh.shape[BLOCK]
    st, bt = stacked_sharding(mesh), batch_sharding(mesh)
    task = trainer.task
    state = jax.eval_shape(lambda: trainer.initial_state(unit, model, task.dummy_batch(2)))
    stack = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=sh), tree)
    batch = stack(task.dummy_batch(int(batch_size or trainer.config.data.batch_size)), bt)
    keys = jax.ShapeDtypeStruct((k, 2), jnp.uint32, sharding=st)
    return stack(state, st), batch, keys, jax.ShapeDtypeStruct((k, 2), jnp.float32, sharding=st)


# -- moving data onto the mesh --------------------------------------------------------------------------------------

def put_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array (each process places its own shards)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _local_box(sharding: NamedSharding, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The (blocks, examples) rectangle of a [K, bs] array that this process's devices hold."""
    boxes = [[s.indices(n)[:2] for s, n in zip(idx, shape)]
             for idx in sharding.addressable_devices_indices_map(shape).values()]
    return tuple(slice(min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(2))


def global_batch(trainer: engine.Trainer, units: list[Unit], step: int, sharding: NamedSharding) -> dict:
    """The blocks' batches at `step`, [K, bs, ...]; this process loads only the blocks its devices hold and feeds
    only its slice of their examples. Each block's batch is Trainer.batch(unit, step), as in sequential training."""
    k, bs = len(units), int(trainer.config.data.batch_size)
    rows, cols = _local_box(sharding, (k, bs))
    parts = [trainer.batch(units[i], step) for i in range(rows.start, rows.stop)]
    local = jax.tree.map(lambda *xs: np.stack([x[cols] for x in xs]), *parts)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x, (k, bs, *x.shape[2:])), local)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (a gather across processes when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


class _Stack:
    """Take one block out of a stacked state (replicated, for Orbax) and put one back, without ever gathering the
    whole stack on a device: a masked sum over the block axis is a local select plus one reduction per leaf."""

    def __init__(self, mesh: Mesh):
        st, rep = stacked_sharding(mesh), NamedSharding(mesh, P())
        k = mesh.shape[BLOCK]

        def mask(i, x):  # [K, 1, ...] True at block i
            return (jnp.arange(k) == i).reshape((k,) + (1,) * (x.ndim - 1))

        self.take = jax.jit(lambda s, i: jax.tree.map(
            lambda x: jnp.where(mask(i, x), x, jnp.zeros_like(x)).sum(0, dtype=x.dtype), s), out_shardings=rep)
        self.put = jax.jit(lambda s, x, i: jax.tree.map(lambda a, b: jnp.where(mask(i, a), b[None], a), s, x),
                           out_shardings=st, donate_argnums=0)
        self.zeros = lambda abstract: jax.jit(lambda: jax.tree.map(  # noqa: E731
            lambda x: jnp.zeros((k, *x.shape), x.dtype), abstract), out_shardings=st)()
        self.replicated = rep

    def block(self, state: State, i: int) -> State:
        """Block i's state as Orbax should save it: one process holds it on its first device, exactly as the
        sequential engine does; several processes hold it replicated over the mesh (a global array, each shard
        written once by Orbax)."""
        one = self.take(state, i)
        if jax.process_count() == 1:
            one = jax.device_put(one, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        return one


# -- training -----------------------------------------------------------------------------------------------------

def _group(trainer: engine.Trainer, units: list[Unit], starts: dict[str, int]) -> list[list[Unit]]:
    """Units that can share one stacked step: the same model shape and the same start step, in block order."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((repr(trainer.model(u)), starts[u.name]), []).append(u)
    return list(groups.values())


def _start_step(trainer: engine.Trainer, unit: Unit, ckpt) -> int:
    """The step a unit resumes from: its newest good checkpoint (an unreadable newer one is moved aside first, so
    the wave restores exactly this step). With several processes, process 0's answer is every process's."""
    step = int(ckpt.verified_latest_step(trainer.abstract_state(unit, trainer.model(unit))) or 0)
    if jax.process_count() > 1:
        step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
    return step


def train_units(trainer: engine.Trainer, units: list[Unit], return_params: bool = False) -> dict[str, Any]:
    """Trains `units` on a ('block', 'data') mesh, up to K same-shape blocks at once (a wave). Returns, with
    return_params, {unit name: final params} as numpy trees, like dblocks.train.train."""
    c = trainer.config
    total = int(c.train.steps)
    mesh_shape(c, 1)  # a mesh that cannot fit is refused before any directory is touched
    ckpts = {u.name: trainer.checkpoint(u) for u in units}
    finals: dict[str, Any] = {}
    try:
        starts = {u.name: _start_step(trainer, u, ckpts[u.name]) for u in units}
        trainer.record_config()
        for u in [u for u in units if starts[u.name] >= total]:
            done = ckpts.pop(u.name)
            done.close()
            if return_params:  # restores it and logs the skip
                finals[u.name] = jax.device_get(trainer.train_unit(u)["params"])
            else:
                done.write_meta(complete=True, step=starts[u.name])
                logs.log.info("[%s] already trained (%d steps); skipping", u.name, total)
        todo = [u for u in units if u.name in ckpts]
        if not todo:
            return finals
        groups = _group(trainer, todo, starts)
        k, data = mesh_shape(c, max(len(g) for g in groups))
        mesh = make_mesh(k, data)
        logs.log.info("mesh %s over %d devices (%d processes): %d block(s) at once, batch %d per block split %d "
                      "ways", dict(mesh.shape), k * data, jax.process_count(), k, int(c.data.batch_size), data)
        stack, compiled, inits = _Stack(mesh), {}, {}
        for group in groups:
            model = trainer.model(group[0])
            if repr(model) not in compiled:
                compiled[repr(model)] = make_parallel_step(trainer, model, mesh)
            for w in range(0, len(group), k):
                wave = _Wave(trainer, model, mesh, stack, compiled[repr(model)], group[w:w + k],
                             [ckpts[u.name] for u in group[w:w + k]], starts[group[w].name], inits)
                loop.run(wave, wave.start, total, c, trainer.writer, trainer.lr_at, trainer.on_step)
                if return_params:
                    for i, u in enumerate(wave.units):
                        finals[u.name] = jax.device_get(stack.block(wave.state, i)["params"])
                del wave  # the wave's device buffers are released before the next wave starts
    finally:
        for ck in ckpts.values():
            ck.close()
    return finals


def init_stack(trainer: engine.Trainer, model, mesh: Mesh, units: list[Unit], cache: dict | None = None) -> State:
    """Fresh stacked states [K, ...]: block k from its init key and first batch, exactly as Trainer.initial_state,
    initialised where it lives (each device computes only its own blocks)."""
    st = stacked_sharding(mesh)
    task, ema = trainer.task, float(trainer.config.optim.ema_decay)
    cache = {} if cache is None else cache
    init = cache.setdefault(repr(model), jax.jit(jax.vmap(
        lambda key, b: steps.init_state(task.init_params(model, key, b), trainer.tx, ema)), out_shardings=st))
    keys = np.stack([np.asarray(steps.init_key(trainer.config.seed, u.index)) for u in units])
    return init(put_global(keys, st), global_batch(trainer, units, 0, batch_sharding(mesh)))


class _Wave:
    """The loop's driver for up to K same-shape blocks in lockstep. Padding slots (a last, short wave) repeat the
    last block and are never saved."""

    def __init__(self, trainer, model, mesh: Mesh, stack: _Stack, step_fn, wave: list[Unit], ckpts: list,
                 start: int, inits: dict):
        k = mesh.shape[BLOCK]
        self.trainer, self.stack, self.step_fn, self.start = trainer, stack, step_fn, start
        self.model, self.mesh, self._eval = model, mesh, None
        self.units, self.ckpts = wave, ckpts
        self.labels = [u.name if u.is_block else "e2e" for u in wave]
        self.padded = wave + [wave[-1]] * (k - len(wave))
        self.devices = list(mesh.devices.flat)
        st = stacked_sharding(mesh)
        self.batch_sharding = batch_sharding(mesh)
        if len(wave) < k:
            logs.log.warning("%d of the mesh's %d block rows repeat %s in this wave (padding, never saved): a block "
                             "count that divides by parallel.blocks, or a larger parallel.data, keeps every device "
                             "busy", k - len(wave), k, wave[-1].name)
        if start == 0:
            self.state = init_stack(trainer, model, mesh, self.padded, inits)
        else:
            self.state = self._restore(model, start)
        for ck in ckpts:
            ck.write_meta(complete=False, step=start)
        seed = trainer.config.seed
        self.base_keys = put_global(np.stack([np.asarray(steps.step_base_key(seed, u.index)) for u in self.padded]), st)
        self.ranges = put_global(np.asarray([u.train_range for u in self.padded], np.float32), st)
        logs.log.info("training %s together on the mesh", ", ".join(self.labels))

    def _restore(self, model, start: int) -> State:
        """Each block's checkpoint restored and put into its slot of the stack (padding repeats the last block)."""
        abstract = jax.eval_shape(lambda: self.trainer.initial_state(self.padded[0], model,
                                                                     self.trainer.task.dummy_batch(2)))
        state = self.stack.zeros(abstract)
        restore_as = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.stack.replicated),
                                  abstract)
        for i, u in enumerate(self.padded):
            one = self.ckpts[min(i, len(self.ckpts) - 1)].restore(restore_as, start)
            state = self.stack.put(state, one, i)
            del one
            if i < len(self.ckpts):
                logs.log.info("[%s] resumed from step %d", u.name, start)
        return state

    def batch(self, step: int):
        return global_batch(self.trainer, self.padded, step, self.batch_sharding)

    def step(self, batch):
        self.state, metrics = self.step_fn(self.state, batch, self.base_keys, self.ranges)
        return metrics

    def eval_loss(self) -> dict | None:
        """{'val_loss': [K]} every block's held-out loss on the device (dblocks.validation); not fetched here. None
        without held-out data."""
        if not self.trainer.heldout():
            return None
        if self._eval is None:
            st, t, k = stacked_sharding(self.mesh), self.trainer, len(self.padded)
            fn = jax.jit(jax.vmap(validation.make_eval_loss(t.task, self.model)),
                         in_shardings=(st, self.batch_sharding, st, st), out_shardings=st)
            batch = jax.tree.map(lambda x: put_global(np.broadcast_to(x, (k, *x.shape)), self.batch_sharding),
                                 t.heldout())
            keys = put_global(np.stack([np.asarray(validation.eval_key(t.config.seed, u.index)) for u in self.padded]),
                              st)
            self._eval = fn, batch, keys
        fn, batch, keys = self._eval
        return {"val_loss": fn(self.state["params"], batch, keys, self.ranges)}

    def lower(self, batch):
        """The step lowered for these arguments (its cost analysis gives FLOPs; dblocks.profiling)."""
        return self.step_fn.lower(self.state, batch, self.base_keys, self.ranges)

    def to_host(self, tree):
        return to_host(tree)

    def unit_metrics(self, host, i: int) -> dict:
        return {n: v[i] for n, v in host.items()}

    def unit_state(self, i: int) -> State:
        return self.stack.block(self.state, i)
