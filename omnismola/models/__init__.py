"""Backbone: SigLIP-like ViT -> connector -> Gemma-like prefix-LM decoder.

layers.py: TokenInfo, Dense, the MLP blocks, norms, RoPE, attention.
  vit.py: the vision encoder. connectors.py: vision -> decoder width.
stack.py: towers of scanned layers and the plan they are built with.
decoder.py: the decoder and its KV cache. vlm.py: the sequence layout and
  the VLM. presets.py: named sizes.
"""
