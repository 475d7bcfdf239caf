"""The configured model: a backbone preset plus the experts the config lists."""
import dataclasses

from flax import nnx

from omnismola.experts import attach
from omnismola.models import presets
from omnismola.models.vlm import VLM


def model_config_to_dict(name: str) -> dict:
  """A preset as plain config fields, for `config.model` in config files."""
  return dict(preset=name, **dataclasses.asdict(presets.get_preset(name)))


def vlm_config(model_fields) -> presets.VLMConfig:
  """The VLMConfig that `config.model` describes (preset name + fields).

  `extra_vits` and `move` may be missing (configs and checkpoints written
  before they existed): no extra encoders, default MoVE options.
  """
  fields = dict(model_fields)
  fields.pop("preset", None)
  return presets.VLMConfig(
      vit=presets.ViTConfig(**fields.pop("vit")),
      decoder=presets.DecoderConfig(**fields.pop("decoder")),
      extra_vits=tuple(presets.ViTConfig(**vit)
                       for vit in fields.pop("extra_vits", ())),
      move=presets.MoVEConfig(**fields.pop("move", {})),
      **fields)


def build_model(config, rng: int = 0) -> VLM:
  """Builds config.model with config.experts attached, at seed `rng`."""
  model_config = vlm_config(config.model)
  # TokenInfo.instance has the decoder's width everywhere (models/vlm.py).
  factory = attach.make_factory(
      config.experts, instance_features=model_config.decoder.width)
  model = VLM(model_config, make_linear=factory.linear,
              make_mlp=factory.mlp, rngs=nnx.Rngs(rng))
  factory.check_all_matched()
  return model
