"""The papers' configs: each stage builds and trains; stages chain."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from omnismola import config_lib
from omnismola.train import init as init_lib
from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import trainer


def _tiny(spec: str, data_dir, steps: int = 2):
  """A config file's variant shrunk to the tiny preset and a few steps."""
  c = config_lib.load_config_file(spec)
  c.model.vit.image_size, c.model.vit.patch_size = 64, 16  # The data's size.
  c.data.tfds_data_dir = str(data_dir)
  c.data.shuffle_buffer = 64
  c.train.update(dict(steps=steps, batch_size=8, log_every=1,
                      checkpoint_every=steps, warmup_steps=0))
  c.eval.at_end = False
  return c


def _train_stages(config_file: str, stages, data_dir, tmp_path,
                  at_zero_lr=()) -> dict:
  """Trains the tiny variant of each stage in turn in `tmp_path/<stage>`,
  each initialised from the previous stage's workdir; {stage: its final
  checkpoint's state}. Stages in `at_zero_lr` take their steps at learning
  rate 0, so their checkpoint is exactly the state they started from."""
  states, previous = {}, ""
  for stage in stages:
    c = _tiny(f"{config_file}:stage={stage},preset=tiny", data_dir)
    if stage in at_zero_lr:
      c.train.lr = 0.0
    c.init.checkpoint = previous
    previous = str(tmp_path / stage)
    trainer.train_and_evaluate(c, previous)
    states[stage] = ocp.StandardCheckpointer().restore(
        f"{previous}/checkpoints/{c.train.steps}/state")
  return states


@pytest.mark.slow
def test_cumo_stages_chain_and_upcycle(synthetic_data_dir, tmp_path):
  """pt trains the connector only; pft everything; vit upcycles the dense
  ViT and connector MLPs of pft into top-2-of-4 experts."""
  states = _train_stages("configs/cumo.py", ("pt", "pft", "vit"),
                         synthetic_data_dir, tmp_path, at_zero_lr=("vit",))
  pt, pft, vit = states["pt"], states["pft"], states["vit"]
  assert set(pt["params"]) == {"connector"}  # Stage 1: the connector only.
  assert {"vit", "connector", "decoder"} <= set(pft["params"])
  moe = vit["params"]["connector"]["mlp"]
  assert moe["router"].shape[-1] == 4
  # Upcycled (vit's steps at learning rate 0): every expert is pft's fc1.
  dense = np.asarray(pft["params"]["connector"]["mlp"]["fc1"]["kernel"])
  experts = np.asarray(moe["layers"]["fc1"]["kernel"])
  assert experts.shape == (4,) + dense.shape
  np.testing.assert_array_equal(experts, np.broadcast_to(dense, experts.shape))
  with open(tmp_path / "vit" / "train_metrics.jsonl") as f:
    row = json.loads(f.readlines()[-1])
  assert row["moe/vit/layers/mlp/balance_loss"] >= 1.0 - 1e-5
  assert "moe/connector/mlp/router_entropy" in row


def test_cumo_rejects_an_unknown_stage():
  with pytest.raises(ValueError, match="unknown stage"):
    config_lib.load_config_file("configs/cumo.py:stage=sft")


def test_vlmoe_trains_moe_lower_layers_under_dense_top(synthetic_data_dir,
                                                       tmp_path):
  """Layer 0 of each tower is MoE (image and text pools in the decoder,
  batch-priority capacity routing in the ViT), layer 1 the dense MLP."""
  c = _tiny("configs/vlmoe.py:preset=tiny,depth=2", synthetic_data_dir)
  trainer.train_and_evaluate(c, str(tmp_path))
  params = ocp.StandardCheckpointer().restore(
      f"{tmp_path}/checkpoints/2/state")["params"]
  assert {"layers_0_1", "layers_1_2"} <= set(params["decoder"])
  assert params["decoder"]["layers_0_1"]["mlp"]["router"].shape[-1] == 8
  assert "gate" in params["decoder"]["layers_1_2"]["mlp"]
  assert params["vit"]["layers_0_1"]["mlp"]["router"].shape[-1] == 4
  assert "fc1" in params["vit"]["layers_1_2"]["mlp"]
  with open(tmp_path / "train_metrics.jsonl") as f:
    row = json.loads(f.readlines()[-1])
  assert row["moe/decoder/layers_0_1/mlp/dropped_fraction"] == 0  # Dropless.
  assert 0 <= row["moe/vit/layers_0_1/mlp/dropped_fraction"] < 1
  assert np.isfinite(row["aux_loss"]) and row["aux_loss"] > 0


def test_vlmoe_rejects_a_bad_moe_layers_fraction():
  with pytest.raises(ValueError, match="moe_layers"):
    config_lib.load_config_file("configs/vlmoe.py:moe_layers=0")


@pytest.mark.slow
def test_awaker_stages_chain_upcycle_the_lora_and_freeze_the_gates(
    synthetic_data_dir, tmp_path):
  """lora trains a LoRA where moe puts routed experts; moe starts every
  expert (and the global one) as that LoRA; frozen_gates keeps moe's
  routers as they were and trains the rest."""
  states = _train_stages("configs/awaker.py", ("lora", "moe", "frozen_gates"),
                         synthetic_data_dir, tmp_path, at_zero_lr=("moe",))
  lora, moe, frozen = (states["lora"], states["moe"],
                       states["frozen_gates"])
  adapters = lambda s, group, name: s[group]["decoder"]["layers"]["mlp"][
      name]["adapters"]
  # Upcycled (moe's steps at learning rate 0): every expert is the LoRA,
  # whose b has left its zero init (so fresh experts would not match).
  for name in ("gate", "up", "down"):
    parent = adapters(lora, "params", name)["lora_1"]
    experts = adapters(moe, "params", name)["sparse_lora_1"]
    assert np.abs(parent["b"]).max() > 0
    for m in ("a", "b"):
      copies = np.asarray(experts["experts"][m])  # [depth, E, ...]
      assert copies.shape[1] == 4
      want = np.asarray(parent[m])[:, None]
      np.testing.assert_array_equal(copies, np.broadcast_to(want, copies.shape))
      np.testing.assert_array_equal(experts["global_expert"][m], parent[m])
  # One router for gate/up/down (stored at down), one for o; frozen in III.
  assert [n for n in ("gate", "up", "down")
          if "router" in adapters(moe, "params", n)["sparse_lora_1"]] == [
              "down"]
  for path in (("mlp", "down"), ("attn", "o")):
    router = lambda s, group: s[group]["decoder"]["layers"][path[0]][path[1]][
        "adapters"]["sparse_lora_1"]["router"]["kernel"]
    np.testing.assert_array_equal(router(frozen, "frozen"),
                                  router(moe, "params"))
  assert "router" not in adapters(frozen, "params", "down")["sparse_lora_1"]
  assert "experts" in adapters(frozen, "params", "down")["sparse_lora_1"]


def test_awaker_rejects_an_unknown_stage():
  with pytest.raises(ValueError, match="unknown stage.*frozen_gates"):
    config_lib.load_config_file("configs/awaker.py:stage=sft")


@pytest.mark.slow
def test_mome_stages_chain_and_copy_the_adapter_into_every_expert(
    synthetic_data_dir, tmp_path):
  """single trains MoVE over two encoders and one adapter beside every
  decoder MLP; mole starts each of its 4 experts as that adapter."""
  states = _train_stages("configs/mome.py", ("single", "mole"),
                         synthetic_data_dir, tmp_path, at_zero_lr=("mole",))
  single, mole = states["single"]["params"], states["mole"]["params"]
  assert {"vit", "vit_1"} <= set(mole)
  assert set(mole["connector"]) == {"vit", "vit_1", "router"}
  adapter = lambda p: p["decoder"]["layers"]["mlp"]["adapters"][
      "sparse_lora_0"]
  assert adapter(single)["router"]["kernel"].shape[-1] == 1
  assert adapter(mole)["router"]["kernel"].shape[-1] == 4
  # Copied (mole's steps at learning rate 0): every expert is the single
  # one, whose b has left its zero init (so fresh experts would not match).
  assert np.abs(adapter(single)["experts"]["b"]).max() > 0
  for m in ("a", "b"):
    parent = np.asarray(adapter(single)["experts"][m])  # [depth, 1, ...]
    copies = np.asarray(adapter(mole)["experts"][m])
    assert copies.shape[1] == 4
    np.testing.assert_array_equal(copies, np.broadcast_to(parent,
                                                          copies.shape))


def test_mome_rejects_an_unknown_stage():
  with pytest.raises(ValueError, match="unknown stage"):
    config_lib.load_config_file("configs/mome.py:stage=sft")


def _initial_model(c, checkpoint: str):
  """The model a run of config `c` starts from, initialised from the
  workdir `checkpoint` as `init.checkpoint` does."""
  mesh = partitioning.make_mesh(dict(c.mesh))
  init_fn, abstract, parts = trainer.create_state(
      c, mesh, optim.make_optimizer(c.train))
  state = init_lib.load_partial(
      checkpoint, init_fn(jax.random.key(c.seed)), abstract,
      upcycle=c.init.upcycle)
  return parts.merge(state.params, state.frozen)


def _random_batch(c, batch=4, prompt=8, suffix=8):
  """Random images and byte tokens, no padding."""
  keys = jax.random.split(jax.random.key(0), 2)
  size = c.model.vit.image_size
  text = jax.random.randint(keys[1], (batch, prompt + suffix), 3, 259)
  return dict(image=jax.random.uniform(keys[0], (batch, size, size, 3),
                                       minval=-1, maxval=1),
              text=text, mask_ar=(jnp.arange(prompt + suffix) >= prompt
                                  ).astype(jnp.int32) * jnp.ones_like(text),
              mask_input=jnp.ones_like(text))


@pytest.mark.slow
def test_awaker_stage_two_starts_with_stage_ones_logits_with_global_expert(
    synthetic_data_dir, tmp_path):
  """Upcycled with the global expert (g + (1 - g) = 1), stage II's first
  forward pass is stage I's last model's, so its first loss is stage I's;
  without it (global_expert=False) the LoRAs are scaled by g < 1."""
  lora = _tiny("configs/awaker.py:stage=lora,preset=tiny", synthetic_data_dir)
  trainer.train_and_evaluate(lora, str(tmp_path))
  batch = _random_batch(lora)
  logits = lambda model: nnx.jit(lambda m, b: m(**b))(model, batch)
  want = logits(_initial_model(lora, str(tmp_path)))
  got = {}
  for global_expert in (True, False):
    c = _tiny(f"configs/awaker.py:stage=moe,preset=tiny,"
              f"global_expert={global_expert}", synthetic_data_dir)
    c.init.checkpoint = str(tmp_path)
    got[global_expert] = logits(_initial_model(c, c.init.checkpoint))
  np.testing.assert_allclose(got[True], want, atol=1e-5)
  loss = lambda logits: float(jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
          logits[:, :-1], batch["text"][:, 1:])))
  assert loss(got[True]) == pytest.approx(loss(want), abs=1e-5)
  assert np.abs(got[False] - want).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("arg,connector", [
    ("encoders=1", {"proj"}),
    ("mixer=add", {"vit", "vit_1"}),
    ("mixer=router", {"vit", "vit_1", "router"}),
])
def test_mome_encoder_ablation_trains(arg, connector, synthetic_data_dir,
                                      tmp_path):
  """One encoder (the preset's connector), two added, two routed."""
  c = _tiny(f"configs/mome.py:preset=tiny,{arg}", synthetic_data_dir,
            steps=1)
  trainer.train_and_evaluate(c, str(tmp_path))
  params = ocp.StandardCheckpointer().restore(
      f"{tmp_path}/checkpoints/1/state")["params"]
  assert set(params["connector"]) == connector
  assert ("vit_1" in params) == (arg != "encoders=1")


@pytest.mark.parametrize("arg", ["encoders=3", "mixer=sum",
                                 "encoders=1,mixer=add"])
def test_mome_rejects_a_bad_encoder_ablation(arg):
  with pytest.raises(ValueError, match="configs/mome.py"):
    config_lib.load_config_file(f"configs/mome.py:{arg}")


@pytest.mark.slow
@pytest.mark.parametrize("moe,pools", [
    ("both", ("image", "text")), ("text", ("text",)), ("image", ("image",)),
    ("none", ())])
def test_vlmoe_modality_ablation_has_exactly_its_pools(moe, pools,
                                                       synthetic_data_dir,
                                                       tmp_path):
  """Experts only where `moe=` puts them: the decoder's layer 0 routes among
  4 experts per pool and keeps the dense MLP (at the dense block's paths)
  for a modality without one; the ViT's layer 0 is MoE with image experts."""
  c = _tiny(f"configs/vlmoe.py:preset=tiny,depth=2,moe={moe}",
            synthetic_data_dir, steps=1)
  trainer.train_and_evaluate(c, str(tmp_path))
  params = ocp.StandardCheckpointer().restore(
      f"{tmp_path}/checkpoints/1/state")["params"]
  towers = {tower: set(params[tower]) & {"layers", "layers_0_1"}
            for tower in ("vit", "decoder")}
  assert towers == {"vit": {"layers_0_1" if "image" in pools else "layers"},
                    "decoder": {"layers_0_1" if pools else "layers"}}
  if pools:
    mlp = params["decoder"]["layers_0_1"]["mlp"]
    assert mlp["router"].shape[-1] == 4 * len(pools)
    # [layers, experts, width, mlp_dim].
    assert mlp["layers"]["gate"]["kernel"].shape[1] == 4 * len(pools)
    dense = {"gate", "up", "down"} if len(pools) == 1 else set()
    assert set(mlp) == {"router", "layers"} | dense
  if "image" in pools:
    assert params["vit"]["layers_0_1"]["mlp"]["router"].shape[-1] == 4
    assert "fc1" in params["vit"]["layers_1_2"]["mlp"]


def test_vlmoe_rejects_an_unknown_moe_value():
  with pytest.raises(ValueError, match="moe='vision'.*image"):
    config_lib.load_config_file("configs/vlmoe.py:moe=vision")
