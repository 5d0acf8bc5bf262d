"""dblocks: DiffusionBlocks (Shing, Koyama, Akiba, ICLR 2026) in JAX/Flax. See README.md and docs/design.md."""
__version__ = "0.1.0"
