"""dblocks: DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026) in JAX/Flax. See README.md and docs/design.md.

  import dblocks
  run = dblocks.load_model("model.npz")   # an exported model (python -m experiments.export) as a Run
"""
__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    """`dblocks.load_model` without importing jax and the tasks on a bare `import dblocks`."""
    if name == "load_model":
        from dblocks.export import load_model
        return load_model
    raise AttributeError(f"module 'dblocks' has no attribute {name!r}")
