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
  """The VLMConfig that `config.model` describes (preset name + fields)."""
  fields = dict(model_fields)
  fields.pop("preset", None)
  return presets.VLMConfig(
      vit=presets.ViTConfig(**fields.pop("vit")),
      decoder=presets.DecoderConfig(**fields.pop("decoder")),
      **fields)


def build_model(config, rng: int = 0) -> VLM:
  """Builds config.model with config.experts attached, at seed `rng`."""
  factory = attach.make_factory(config.experts)
  model = VLM(vlm_config(config.model), make_linear=factory.linear,
              make_mlp=factory.mlp, rngs=nnx.Rngs(rng))
  factory.check_all_matched()
  return model
