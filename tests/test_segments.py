"""Towers split into segments where experts attach to some layers only:
paths, per-layer matching, the KV cache and sliding windows across
segments, and loading one-stack checkpoints into segmented models."""
import jax
import numpy as np
import pytest
from flax import nnx

from omnismola import build, pretrained
from omnismola.models.stack import Segment
from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import init as init_lib
from omnismola.train import optim, partitioning, trainer
from test_models import (GEMMA2, _masking_batch,
                         assert_cached_decoding_matches_forward)
from test_moe_attach import _model, _moe
from test_trainer import tiny_config

DEPTHS = dict(vit_depth=2, decoder_depth=3)
# MoE in layer 0 of each tower, VL-MoE's modality pools in the decoder. The
# decoder's second segment starts at layer 1: Gemma 2's sliding window must
# follow the global layer index (odd: no window), not the segment's.
LOWER_MOE = [
    _moe(r"vit/layers/0/mlp"),
    _moe(r"decoder/layers/0/mlp", num_experts=None,
         pools=dict(image=2, text=2)),
]


def _flat_params(model) -> dict:
  """{parameter path: the nnx.Param}."""
  return {"/".join(map(str, path)): param for path, param in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def _forward(model, *batch):
  return model.forward(*batch)


def test_experts_on_some_layers_split_the_towers_into_segments():
  lora = dict(kind="lora", targets=r"decoder/layers/2/attn/q", rank=2)
  model = _model(LOWER_MOE + [lora], **DEPTHS)
  assert model.vit.segments == (Segment("vit/layers_0_1", 0, 1),
                                Segment("vit/layers_1_2", 1, 2))
  assert model.decoder.segments == (Segment("decoder/layers_0_1", 0, 1),
                                    Segment("decoder/layers_1_2", 1, 2),
                                    Segment("decoder/layers_2_3", 2, 3))
  params = _flat_params(model)
  assert not any(p.startswith(("vit/layers/", "decoder/layers/"))
                 for p in params)
  shapes = {  # path -> (shape, logical axes): one layer per segment here.
      "vit/layers_0_1/mlp/layers/fc1/kernel": ((1, 4, 48, 64),
                                               ("layers", "expert", "embed",
                                                "mlp")),
      "vit/layers_1_2/mlp/fc1/kernel": ((1, 48, 64),
                                        ("layers", "embed", "mlp")),
      "decoder/layers_0_1/mlp/router": ((1, 32, 4),
                                        ("layers", "embed", "expert")),
      "decoder/layers_1_2/mlp/gate/kernel": ((1, 32, 64),
                                             ("layers", "embed", "mlp")),
      "decoder/layers_2_3/attn/q/adapters/lora_2/a": ((1, 32, 2),
                                                      ("layers", "embed",
                                                       "lora_rank")),
  }
  for path, (shape, axes) in shapes.items():
    assert params[path].shape == shape, path
    assert params[path].get_metadata()["logical_axes"] == axes, path
  # Regexes address layers by their index in the whole tower.
  assert model.decoder.layers_2_3.attn.q.adapters is not None
  assert model.decoder.layers_1_2.attn.q.adapters is None
  _, reports = _forward(model, *_masking_batch(model))
  assert {path: report["routing"].balance_loss.shape
          for path, report in reports.items()} == {
      "vit/layers_0_1/mlp": (1,), "decoder/layers_0_1/mlp": (1,)}


def test_one_segment_models_keep_todays_paths():
  """Experts on all layers or none: one stack at `<tower>/layers`, the
  layout of converted checkpoints."""
  model = _model([_moe(r"decoder/layers/\d+/mlp")])  # 2 layers each.
  assert model.decoder.segments == (Segment("decoder/layers", 0, 2),)
  params = _flat_params(model)
  assert sorted(params) == [
      "connector/mlp/fc1/bias", "connector/mlp/fc1/kernel",
      "connector/mlp/fc2/bias", "connector/mlp/fc2/kernel",
      "decoder/embedder/embedding", "decoder/final_norm/scale",
      "decoder/layers/attn/k/kernel", "decoder/layers/attn/o/kernel",
      "decoder/layers/attn/q/kernel", "decoder/layers/attn/v/kernel",
      "decoder/layers/mlp/layers/down/kernel",
      "decoder/layers/mlp/layers/gate/kernel",
      "decoder/layers/mlp/layers/up/kernel", "decoder/layers/mlp/router",
      "decoder/layers/pre_attn_norm/scale",
      "decoder/layers/pre_mlp_norm/scale",
      "vit/embedding/bias", "vit/embedding/kernel",
      "vit/layers/attn/k/bias", "vit/layers/attn/k/kernel",
      "vit/layers/attn/o/bias", "vit/layers/attn/o/kernel",
      "vit/layers/attn/q/bias", "vit/layers/attn/q/kernel",
      "vit/layers/attn/v/bias", "vit/layers/attn/v/kernel",
      "vit/layers/mlp/fc1/bias", "vit/layers/mlp/fc1/kernel",
      "vit/layers/mlp/fc2/bias", "vit/layers/mlp/fc2/kernel",
      "vit/layers/norm1/bias", "vit/layers/norm1/scale",
      "vit/layers/norm2/bias", "vit/layers/norm2/scale",
      "vit/norm/bias", "vit/norm/scale", "vit/pos_embedding"]
  assert params["decoder/layers/attn/q/kernel"].shape == (2, 32, 32)


def test_cached_decoding_of_a_segmented_gemma2_decoder_matches_forward():
  model = _model(LOWER_MOE, **DEPTHS, **GEMMA2)
  assert len(model.decoder.segments) == 2
  assert_cached_decoding_matches_forward(model)


def _gemma2_config(experts):
  """The trainer's tiny config, 3 decoder layers with Gemma 2's switches."""
  c = tiny_config()
  c.experts = experts
  c.model.vit.depth, c.model.decoder.depth = 2, 3
  c.model.decoder.update({k[len("decoder_"):]: v for k, v in GEMMA2.items()})
  return c


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
  """(dense model, directory of its one-stack checkpoint)."""
  config = _gemma2_config([])
  dense = build.build_model(config, rng=0)
  directory = str(tmp_path_factory.mktemp("dense"))
  writer = checkpoint_lib.Checkpointer(f"{directory}/checkpoints", keep=1,
                                       async_save=False)
  writer.save(0, {"params": nnx.to_pure_dict(nnx.state(dense, nnx.Param))},
              {}, dict(model=config.model.to_dict(), experts=[]))
  writer.close()
  return dense, directory


def test_segmented_moe_upcycled_from_a_one_stack_checkpoint_computes_it(
    dense_checkpoint):
  """init.checkpoint = a dense run: the lower layers' MoE experts start as
  copies of their dense MLPs (sliced from `decoder/layers/...`), the upper
  segment loads the rest of the stack, so the model computes the dense
  model's logits (renormalised gates over identical experts)."""
  dense, directory = dense_checkpoint
  config = _gemma2_config(LOWER_MOE)
  mesh = partitioning.make_mesh(dict(config.mesh))
  init_fn, abstract, parts = trainer.create_state(
      config, mesh, optim.make_optimizer(config.train))
  state = init_lib.load_partial(directory, init_fn(jax.random.key(1)),
                                abstract)
  up = np.asarray(dense.decoder.layers.mlp.up.kernel[...])
  experts = state.params["decoder"]["layers_0_1"]["mlp"]["layers"]
  for e in range(4):
    np.testing.assert_array_equal(experts["up"]["kernel"][:, e], up[:1])
  np.testing.assert_array_equal(
      state.params["decoder"]["layers_1_3"]["mlp"]["up"]["kernel"], up[1:])

  batch = _masking_batch(dense)
  want, _ = _forward(dense, *batch)
  got, reports = _forward(parts.merge(state.params, state.frozen), *batch)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert sorted(reports) == ["decoder/layers_0_1/mlp", "vit/layers_0_1/mlp"]


def test_from_pretrained_loads_a_one_stack_checkpoint_into_segments(
    dense_checkpoint):
  """Fresh (zero-output) adapters on some layers: segments, same logits."""
  dense, directory = dense_checkpoint
  model = pretrained.from_pretrained(directory, experts=[
      dict(kind="lora", targets=r"decoder/layers/(1|2)/attn/(q|v)", rank=2),
      dict(kind="smola", targets=r"vit/layers/1/mlp/fc1",
           pools=dict(image=2), rank=2)])
  assert [s.path for s in model.decoder.segments] == [
      "decoder/layers_0_1", "decoder/layers_1_3"]
  assert [s.path for s in model.vit.segments] == [
      "vit/layers_0_1", "vit/layers_1_2"]
  batch = _masking_batch(dense)
  np.testing.assert_allclose(_forward(model, *batch)[0],
                             _forward(dense, *batch)[0], rtol=0, atol=1e-5)
