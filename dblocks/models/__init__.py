"""Flax linen models: AdaLN-Zero layers and the model families (DiT, ViT, language models)."""
