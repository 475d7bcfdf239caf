"""Named model sizes, with flat overrides.

  get_preset("small")                                  # the CPU default
  get_preset("tiny", decoder_depth=2, vit_width=48)    # tests
  get_preset("paligemma_3b_224")                       # PaliGemma 3B shapes

Overrides are flat keys: `vit_<field>`, `decoder_<field>` and the other
VLMConfig fields (`connector`, ...); an unknown key is an error that lists
the valid ones. Large presets are only built with `jax.eval_shape` (tests
check their parameter counts; the AOT check).
"""
import dataclasses

from omnismola.models.decoder import DecoderConfig
from omnismola.models.vit import ViTConfig
from omnismola.models.vlm import VLMConfig

# 256 byte values plus 3 special tokens (pad 0 and eos 1 among them): the
# vocabulary of the built-in synthetic tasks.
_BYTE_VOCAB = 259
# Gemma's 256,000 tokens + 1,024 <locXXXX> + 128 <segXXX> tokens.
_PALIGEMMA_VOCAB = 257_152


def _siglip_so400m(image_size: int) -> ViTConfig:
  """SigLIP So400m/14, PaliGemma's (and PaliGemma 2's) image encoder."""
  return ViTConfig(image_size=image_size, patch_size=14, width=1152,
                   depth=27, num_heads=16, mlp_dim=4304)


def _gemma2(width, depth, num_heads, num_kv_heads, head_dim, mlp_dim,
            query_pre_attn_scalar) -> DecoderConfig:
  """A Gemma 2 size: post norms, soft caps 50 / 30, window 4096."""
  return DecoderConfig(vocab_size=_PALIGEMMA_VOCAB, width=width, depth=depth,
                       num_heads=num_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, mlp_dim=mlp_dim, post_norms=True,
                       attn_logit_softcap=50.0, final_logit_softcap=30.0,
                       query_pre_attn_scalar=query_pre_attn_scalar,
                       sliding_window=4096)


# PaliGemma's language model (Gemma 1 2B) and PaliGemma 2's (Gemma 2 2B /
# 9B / 27B), by the name prefix of their presets.
_PALIGEMMA_DECODERS = {
    "paligemma_3b": DecoderConfig(
        vocab_size=_PALIGEMMA_VOCAB, width=2048, depth=18, num_heads=8,
        num_kv_heads=1, head_dim=256, mlp_dim=16_384),
    "paligemma2_3b": _gemma2(2304, 26, 8, 4, 256, 9216, 256),
    "paligemma2_10b": _gemma2(3584, 42, 16, 8, 256, 14_336, 256),
    "paligemma2_28b": _gemma2(4608, 46, 32, 16, 128, 36_864, 144),
}
_RESOLUTIONS = (224, 448, 896)

PRESETS: dict[str, VLMConfig] = {
    # Smallest shapes that exercise every code path (GQA included): tests.
    "tiny": VLMConfig(
        vit=ViTConfig(image_size=16, patch_size=8, width=32, depth=1,
                      num_heads=2, mlp_dim=64),
        decoder=DecoderConfig(vocab_size=_BYTE_VOCAB, width=32, depth=1,
                              num_heads=2, num_kv_heads=1, head_dim=16,
                              mlp_dim=64)),
    # Trains on a laptop CPU in minutes: 64 image tokens.
    "small": VLMConfig(
        vit=ViTConfig(image_size=64, patch_size=8, width=128, depth=2,
                      num_heads=4, mlp_dim=256),
        decoder=DecoderConfig(vocab_size=_BYTE_VOCAB, width=128, depth=3,
                              num_heads=4, num_kv_heads=1, head_dim=32,
                              mlp_dim=256)),
    # SigLIP So400m + those decoders: 256 / 1024 / 4096 image tokens.
    **{f"{name}_{res}": VLMConfig(vit=_siglip_so400m(res), decoder=decoder,
                                  remat_policy="dots_no_batch")
       for name, decoder in _PALIGEMMA_DECODERS.items()
       for res in _RESOLUTIONS},
    # PaLI-X's size for sharding and memory checks, not PaLI-X: ViT-22B's
    # shape and a ~33B decoder-only LM standing in for its UL2.
    "palix_55b": VLMConfig(
        vit=ViTConfig(image_size=224, patch_size=14, width=6144, depth=48,
                      num_heads=48, mlp_dim=24_576),
        decoder=DecoderConfig(vocab_size=_PALIGEMMA_VOCAB, width=8192,
                              depth=42, num_heads=64, num_kv_heads=8,
                              head_dim=128, mlp_dim=24_576),
        remat_policy="full"),
}


def override_keys() -> list[str]:
  """Every key `get_preset` accepts as an override."""
  vit = [f"vit_{f.name}" for f in dataclasses.fields(ViTConfig)]
  decoder = [f"decoder_{f.name}" for f in dataclasses.fields(DecoderConfig)]
  top = [f.name for f in dataclasses.fields(VLMConfig)
         if f.name not in ("vit", "decoder")]
  return vit + decoder + top


def get_preset(name: str, **overrides) -> VLMConfig:
  """The preset `name` with flat overrides applied (see module docstring)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; presets: "
                     f"{sorted(PRESETS)}.")
  unknown = sorted(set(overrides) - set(override_keys()))
  if unknown:
    raise ValueError(f"Unknown model override(s) {unknown}; valid keys: "
                     f"{override_keys()}.")
  config = PRESETS[name]
  pick = lambda prefix: {k[len(prefix):]: v for k, v in overrides.items()
                         if k.startswith(prefix)}
  top = {k: v for k, v in overrides.items()
         if not k.startswith(("vit_", "decoder_"))}
  return dataclasses.replace(
      config,
      vit=dataclasses.replace(config.vit, **pick("vit_")),
      decoder=dataclasses.replace(config.decoder, **pick("decoder_")),
      **top)
