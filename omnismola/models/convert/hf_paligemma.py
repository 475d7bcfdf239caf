"""Hugging Face PaliGemma / PaliGemma 2 checkpoints -> our config and params.

Reads `config.json` and the safetensors weights of a
`PaliGemmaForConditionalGeneration` directory with numpy only. Sizes come
from the weights; what they cannot tell (head counts, eps, RoPE base, Gemma
2's constants) from config.json, with transformers' defaults for fields it
leaves out. The three weight-name layouts transformers has written are
accepted by stripping the known prefixes:
  language_model.model.layers.0...   vision_tower.vision_model.encoder...
  language_model.model.layers.0...   vision_tower.encoder...     (5.x save)
  model.language_model.layers.0...   model.vision_tower.vision_model...
Linear weights are [out, in] there and [in, out] here; layers are stacked.
"""
import json
import re

import numpy as np

from omnismola import storage
from omnismola.models.convert import safetensors_io

# transformers' defaults for fields a config.json may leave out.
_GEMMA_DEFAULTS = dict(head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000.0,
                       hidden_activation="gelu_pytorch_tanh",
                       num_attention_heads=8, num_key_value_heads=1)
_GEMMA2_DEFAULTS = dict(_GEMMA_DEFAULTS, num_key_value_heads=4,
                        query_pre_attn_scalar=256, sliding_window=4096,
                        attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0)
_SIGLIP_DEFAULTS = dict(layer_norm_eps=1e-6, num_attention_heads=12,
                        hidden_act="gelu_pytorch_tanh")
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")

_PREFIXES = {
    "vision": ("model.vision_tower.vision_model.", "vision_tower.vision_model.",
               "model.vision_tower.", "vision_tower."),
    "text": ("model.language_model.", "language_model.model.",
             "language_model."),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector."),
}
# Weights PaliGemma does not use: SigLIP's pooling head, an untied copy of
# the embedding.
_UNUSED = re.compile(r"(.*vision_tower\.(vision_model\.)?head\..*|"
                     r"(model\.|language_model\.)?lm_head\.weight)")


def _split_by_tower(weights: dict[str, np.ndarray]):
  """{tower: {name without prefix: array}}; unknown names are an error."""
  towers = {tower: {} for tower in _PREFIXES}
  for name, array in weights.items():
    if _UNUSED.fullmatch(name):
      continue
    for tower, prefixes in _PREFIXES.items():
      prefix = next((p for p in prefixes if name.startswith(p)), None)
      if prefix:
        towers[tower][name[len(prefix):]] = array
        break
    else:
      raise ValueError(f"Unexpected weight {name!r}: not part of a "
                       "PaliGemma vision tower, projector or language model.")
  return towers


class _Reader:
  """Takes named weights out of a dict, so leftovers can be reported."""

  def __init__(self, tower: str, weights: dict[str, np.ndarray]):
    self.tower = tower
    self.weights = dict(weights)

  def take(self, name: str) -> np.ndarray:
    if name not in self.weights:
      raise ValueError(f"The checkpoint lacks the {self.tower} weight "
                       f"{name!r}.")
    return np.asarray(self.weights.pop(name))

  def linear(self, name: str) -> np.ndarray:
    """A torch Linear weight [out, in] as our kernel [in, out]."""
    return self.take(f"{name}.weight").T

  def stacked(self, depth: int, prefix: str):
    """(take, linear) of `name` in layers 0..depth-1 at `prefix`
    ('layers.{}.'), stacked."""
    layers = [prefix.format(i) for i in range(depth)]
    return (lambda name: np.stack([self.take(p + name) for p in layers]),
            lambda name: np.stack([self.linear(p + name) for p in layers]))

  def check_used(self) -> None:
    if self.weights:
      raise ValueError(f"Unused {self.tower} weights: "
                       f"{sorted(self.weights)[:10]}...")


def _depth(weights: dict[str, np.ndarray], pattern: str) -> int:
  found = {int(m.group(1)) for n in weights
           for m in [re.match(pattern, n)] if m}
  if not found or sorted(found) != list(range(len(found))):
    raise ValueError(f"Layers matching {pattern!r} are missing or not "
                     f"numbered 0..n-1: {sorted(found)}.")
  return len(found)


def _vision(weights, config: dict):
  config = {**_SIGLIP_DEFAULTS, **config}
  if config["hidden_act"] not in _TANH_GELU:
    raise ValueError(f"Vision hidden_act {config['hidden_act']!r} is not "
                     "the tanh GELU omnismola's ViT uses.")
  r = _Reader("vision tower", weights)
  depth = _depth(r.weights, r"encoder\.layers\.(\d+)\.")
  conv = r.take("embeddings.patch_embedding.weight")  # [W, 3, p, p]
  width, _, patch, _ = conv.shape
  pos = r.take("embeddings.position_embedding.weight")
  grid = int(round(np.sqrt(pos.shape[0])))
  layer, linear = r.stacked(depth, "encoder.layers.{}.")
  attn = {ours: dict(kernel=linear(f"self_attn.{theirs}"),
                     bias=layer(f"self_attn.{theirs}.bias"))
          for ours, theirs in (("q", "q_proj"), ("k", "k_proj"),
                               ("v", "v_proj"), ("o", "out_proj"))}
  mlp = {n: dict(kernel=linear(f"mlp.{n}"), bias=layer(f"mlp.{n}.bias"))
         for n in ("fc1", "fc2")}
  norm = lambda read, name: dict(scale=read(f"{name}.weight"),
                                 bias=read(f"{name}.bias"))
  params = dict(
      # Conv [W, 3, p, p] -> [p, p, 3, W] -> rows in (row, col, channel).
      embedding=dict(kernel=conv.transpose(2, 3, 1, 0).reshape(-1, width),
                     bias=r.take("embeddings.patch_embedding.bias")),
      pos_embedding=pos,
      layers=dict(norm1=norm(layer, "layer_norm1"), attn=attn,
                  norm2=norm(layer, "layer_norm2"), mlp=mlp),
      norm=norm(r.take, "post_layernorm"))
  r.check_used()
  fields = dict(image_size=grid * patch, patch_size=patch, width=width,
                depth=depth, num_heads=config["num_attention_heads"],
                mlp_dim=mlp["fc1"]["kernel"].shape[-1],
                norm_eps=config["layer_norm_eps"])
  return fields, params


def _text(weights, config: dict):
  model_type = config.get("model_type", "gemma")
  if model_type not in ("gemma", "gemma2"):
    raise ValueError(f"Language model type {model_type!r} is not supported "
                     "(gemma and gemma2 are).")
  gemma2 = model_type == "gemma2"
  config = {**(_GEMMA2_DEFAULTS if gemma2 else _GEMMA_DEFAULTS), **config}
  if config["hidden_activation"] not in _TANH_GELU:
    raise ValueError(f"hidden_activation {config['hidden_activation']!r} is "
                     "not the tanh GELU omnismola's decoder uses.")
  rope = config.get("rope_parameters") or {}
  rope_theta = rope.get("rope_theta", config["rope_theta"])
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"RoPE scaling {rope} is not supported.")

  r = _Reader("language model", weights)
  depth = _depth(r.weights, r"layers\.(\d+)\.")
  layer, linear = r.stacked(depth, "layers.{}.")
  norm = lambda name: dict(scale=layer(f"{name}.weight"))
  layers = dict(
      pre_attn_norm=norm("input_layernorm"),
      attn={n: dict(kernel=linear(f"self_attn.{n}_proj")) for n in "qkvo"},
      mlp={n: dict(kernel=linear(f"mlp.{n}_proj"))
           for n in ("gate", "up", "down")})
  if gemma2:
    layers.update(post_attn_norm=norm("post_attention_layernorm"),
                  pre_mlp_norm=norm("pre_feedforward_layernorm"),
                  post_mlp_norm=norm("post_feedforward_layernorm"))
  else:  # Gemma 1 calls its pre-MLP norm "post_attention_layernorm".
    layers.update(pre_mlp_norm=norm("post_attention_layernorm"))
  embedding = r.take("embed_tokens.weight")
  params = dict(embedder=dict(embedding=embedding), layers=layers,
                final_norm=dict(scale=r.take("norm.weight")))
  r.check_used()

  vocab_size, width = embedding.shape
  num_heads, head_dim = config["num_attention_heads"], config["head_dim"]
  if layers["attn"]["q"]["kernel"].shape[-1] != num_heads * head_dim:
    raise ValueError(f"q_proj has {layers['attn']['q']['kernel'].shape[-1]} "
                     f"outputs, not num_attention_heads={num_heads} x "
                     f"head_dim={head_dim}.")
  fields = dict(
      vocab_size=vocab_size, width=width, depth=depth, num_heads=num_heads,
      num_kv_heads=config["num_key_value_heads"], head_dim=head_dim,
      mlp_dim=layers["mlp"]["gate"]["kernel"].shape[-1],
      rope_max_wavelength=float(rope_theta),
      norm_eps=config["rms_norm_eps"], post_norms=gemma2)
  if gemma2:
    _check_even_layers_slide(config, depth)
    fields.update(
        attn_logit_softcap=float(config["attn_logit_softcapping"] or 0.0),
        final_logit_softcap=float(config["final_logit_softcapping"] or 0.0),
        query_pre_attn_scalar=float(config["query_pre_attn_scalar"]),
        sliding_window=int(config["sliding_window"] or 0))
  return fields, params


def _check_even_layers_slide(config: dict, depth: int) -> None:
  """Gemma 2 alternates sliding and full layers, starting with sliding."""
  expected = ["sliding_attention" if i % 2 == 0 else "full_attention"
              for i in range(depth)]
  layer_types = config.get("layer_types")
  if layer_types is not None and list(layer_types) != expected:
    raise ValueError(f"layer_types {layer_types} is not Gemma 2's "
                     "alternation (sliding on even layers), the only one "
                     "supported.")


def load(directory: str):
  """A PaliGemma checkpoint directory -> (dict(vit=..., decoder=...,
  connector="linear"), nested dict of numpy arrays in our layout)."""
  config_path = storage.path(directory) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{directory}: no config.json (expected a "
                            "Hugging Face PaliGemma checkpoint directory).")
  config = json.loads(config_path.read_text())
  if config.get("model_type") != "paligemma":
    raise ValueError(f"{config_path}: model_type is "
                     f"{config.get('model_type')!r}, not 'paligemma'.")
  towers = _split_by_tower(safetensors_io.read_checkpoint(directory))
  vit_fields, vit_params = _vision(towers["vision"],
                                   config.get("vision_config", {}))
  decoder_fields, decoder_params = _text(towers["text"],
                                         config.get("text_config", {}))
  projector = _Reader("projector", towers["projector"])
  connector = dict(proj=dict(kernel=projector.linear("linear"),
                             bias=projector.take("linear.bias")))
  projector.check_used()
  fields = dict(vit=vit_fields, decoder=decoder_fields, connector="linear")
  params = dict(vit=vit_params, connector=connector, decoder=decoder_params)
  return fields, params
