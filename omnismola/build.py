"""The configured model: a backbone preset plus the experts the config lists."""
import dataclasses

from flax import nnx

from omnismola.experts import attach
from omnismola.models import presets
from omnismola.models.connectors import MoVEConfig
from omnismola.models.vlm import VLM


def model_config_to_dict(name: str) -> dict:
  """A preset as plain config fields, for `config.model` in config files."""
  return dict(preset=name, **dataclasses.asdict(presets.get_preset(name)))


def shape_fields(name: str, shape) -> dict:
  """`config.model` fields of a model given by its sizes alone, {vit,
  decoder, connector} (as converters and benchmarks write them; no extra
  encoders), every other field at its default; `name` is its preset."""
  config = presets.VLMConfig(vit=presets.ViTConfig(**shape["vit"]),
                             decoder=presets.DecoderConfig(**shape["decoder"]),
                             connector=shape["connector"])
  return dict(preset=name, **dataclasses.asdict(config))


def vlm_config(model_fields) -> presets.VLMConfig:
  """The VLMConfig that `config.model` describes (preset name + fields)."""
  fields = {k: v for k, v in model_fields.items() if k != "preset"}
  return presets.VLMConfig(
      vit=presets.ViTConfig(**fields.pop("vit")),
      decoder=presets.DecoderConfig(**fields.pop("decoder")),
      extra_vits=tuple(presets.ViTConfig(**vit)
                       for vit in fields.pop("extra_vits")),
      move=MoVEConfig(**fields.pop("move")),
      **fields)


# The fields that fix which parameters exist and their shapes: a checkpoint
# loads only into a model that agrees on all of them.
SHAPE_FIELDS = dict(
    vit=("image_size", "patch_size", "width", "depth", "num_heads",
         "mlp_dim"),
    decoder=("vocab_size", "width", "depth", "num_heads", "num_kv_heads",
             "head_dim", "mlp_dim", "post_norms"))


def agree_with_checkpoint(model_fields, saved) -> tuple[dict, list[str]]:
  """(config.model's fields made to agree with a checkpoint's saved
  `model`, lines describing what differs).

  The decoder's vocab_size is the checkpoint's (Hugging Face pads Gemma's
  embedding, big_vision does not); any other shape field that differs is a
  ValueError naming each. Fields that change the function but not the
  shapes stay the config's, so a recipe may change them (docs/models.md).
  """
  fields = {**model_fields, "vit": dict(model_fields["vit"]),
            "decoder": dict(model_fields["decoder"])}
  mismatched, notes = [], []
  for tower, names in SHAPE_FIELDS.items():
    ours, theirs = fields[tower], saved[tower]
    for name in ours:
      if name not in theirs or ours[name] == theirs[name]:
        continue
      field = f"config.model.{tower}.{name}={ours[name]!r}"
      if (tower, name) == ("decoder", "vocab_size"):
        notes.append(f"{field} -> {theirs[name]}: the checkpoint's "
                     f"embedding has {theirs[name]} rows.")
        ours[name] = theirs[name]
      elif name in names:
        mismatched.append(f"{field} but the checkpoint's is "
                          f"{theirs[name]!r}")
      else:
        notes.append(f"{field} differs from the checkpoint's "
                     f"{theirs[name]!r}; the config's value is used.")
  if mismatched:
    raise ValueError("the checkpoint's model has other shapes: " +
                     "; ".join(mismatched) + ". Use the checkpoint's values "
                     "(or the preset of that model).")
  return fields, notes


def check_vocabulary_fits(model_fields, vocabulary, name: str) -> None:
  """Raises ValueError when token ids of `vocabulary` (config.data's `name`)
  would fall outside the decoder's embedding."""
  rows = model_fields["decoder"]["vocab_size"]
  if vocabulary.vocab_size > rows:
    raise ValueError(f"config.data.vocabulary={name!r} has "
                     f"{vocabulary.vocab_size} tokens but "
                     f"config.model.decoder.vocab_size={rows}: its ids would "
                     "fall outside the embedding. Use the model's own "
                     "tokenizer.")


def build_model(config, rng: int = 0) -> VLM:
  """Builds config.model with config.experts attached, at seed `rng`."""
  model_config = vlm_config(config.model)
  return VLM(model_config, plan=expert_plan(config.experts, model_config),
             rngs=nnx.Rngs(rng))


def expert_plan(expert_entries, model_config: presets.VLMConfig):
  """Where `config.experts` attach in the model `model_config` describes:
  planned on that model built without experts, traced, not allocated."""
  backbone = nnx.eval_shape(lambda: VLM(model_config, rngs=nnx.Rngs(0)))
  # TokenInfo.instance has the decoder's width everywhere (models/vlm.py).
  return attach.make_plan(expert_entries, backbone,
                          instance_features=model_config.decoder.width)
