"""Named model sizes, with flat overrides.

  get_preset("small")                                  # the CPU default
  get_preset("tiny", decoder_depth=2, vit_width=48)    # tests

Overrides are flat keys: `vit_<field>` for ViTConfig fields,
`decoder_<field>` for DecoderConfig fields, and `connector`. Flat keys map
one-to-one onto `--config.model...` style overrides and typos fail loudly:
an unknown key is an error that lists the valid ones.
"""
import dataclasses

from omnismola.models.decoder import DecoderConfig
from omnismola.models.vit import ViTConfig
from omnismola.models.vlm import VLMConfig

# 256 byte values plus 3 special tokens (pad 0 and eos 1 among them): the
# vocabulary of the built-in synthetic tasks.
_BYTE_VOCAB = 259

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
}


def override_keys() -> list[str]:
  """Every key `get_preset` accepts as an override."""
  vit = [f"vit_{f.name}" for f in dataclasses.fields(ViTConfig)]
  decoder = [f"decoder_{f.name}" for f in dataclasses.fields(DecoderConfig)]
  return vit + decoder + ["connector"]


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
  return dataclasses.replace(
      config,
      vit=dataclasses.replace(config.vit, **pick("vit_")),
      decoder=dataclasses.replace(config.decoder, **pick("decoder_")),
      **({"connector": overrides["connector"]} if "connector" in overrides
         else {}))
