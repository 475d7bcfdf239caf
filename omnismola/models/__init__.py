"""Backbone: SigLIP-like ViT -> connector -> Gemma-like prefix-LM decoder.

layers.py: TokenInfo, Dense and the linear factory, norms, RoPE, attention,
  MLPs. vit.py: the vision encoder. connectors.py: vision -> decoder width.
decoder.py: the decoder and its KV cache. vlm.py: the sequence layout and
  the VLM. presets.py: named sizes.
"""
