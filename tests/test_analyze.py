"""--mode=analyze: routers record per-token expert weights; usage plots."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from omnismola import build, config_lib
from omnismola.data import pipeline
from omnismola.experts.sparse import MoEAux
from omnismola.models import layers
from omnismola.models.vlm import sequence_layout
from omnismola.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLA_POOLS = dict(text=2, image=3, all=2)
NUM_EXPERTS, TOP_K = 3, 2
B, PREFIX, SUFFIX = 2, 3, 3


def _config():
  """`tiny` with 2 decoder layers, SMoLA pools (2 slots per expert) on the
  decoder's q, and sparse MoE in every MLP: ViT, `mlp` connector (outside
  any stack), decoder."""
  c = config_lib.load_config_file("configs/mix.py:preset=tiny")
  c.model.connector = "mlp"
  c.model.decoder.depth = 2
  c.experts = [
      dict(kind="smola", targets=r"decoder/layers/\d+/attn/q",
           pools=SMOLA_POOLS, rank=1, slots_per_expert=2),
      dict(kind="sparse_moe",
           targets=r"vit/layers/\d+/mlp|connector/mlp|decoder/layers/\d+/mlp",
           num_experts=NUM_EXPERTS, top_k=TOP_K),
  ]
  return c


def _random_model(config):
  """The configured model with random (not zero) parameters, so routers see
  varied inputs and adapters change the residual stream. Built from shapes
  and filled by one jitted call (eager init would run op by op)."""
  abstract = nnx.eval_shape(lambda: build.build_model(config))
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree.flatten(state)

  @jax.jit
  def fill(key):
    keys = jax.random.split(key, len(leaves))
    return [jax.random.normal(k, x.shape) * 0.5 for k, x in zip(keys, leaves)]

  return nnx.merge(graphdef,
                   jax.tree.unflatten(treedef, fill(jax.random.key(1))))


@pytest.fixture(scope="module")
def model():
  return _random_model(_config())


@pytest.fixture(scope="module")
def batch():
  """Two examples: image, 3 prefix + 3 suffix tokens; the second has its
  last suffix token padded."""
  keys = jax.random.split(jax.random.key(0), 2)
  mask_input = np.ones((B, PREFIX + SUFFIX), np.int32)
  mask_input[1, -1] = 0
  return dict(
      image=jax.random.uniform(keys[0], (B, 16, 16, 3), minval=-1, maxval=1),
      text=jax.random.randint(keys[1], (B, PREFIX + SUFFIX), 3, 259),
      mask_ar=jnp.asarray([[0] * PREFIX + [1] * SUFFIX] * B),
      mask_input=jnp.asarray(mask_input))


def _forward(model, batch, record: bool, shapes_only: bool = False):
  """model.forward(**batch), jitted (or only its shapes), recording or not.
  """
  def forward(state, batch):
    m = nnx.merge(graphdef, state)
    if not record:
      return m.forward(**batch)
    with layers.recording_usage():
      return m.forward(**batch)

  graphdef, state = nnx.split(model)
  if shapes_only:
    return jax.eval_shape(forward, state, batch)
  return jax.jit(forward)(state, batch)


@pytest.fixture(scope="module")
def recorded(model, batch):
  return _forward(model, batch, record=True)


def _smola_path(pool):
  return f"decoder/layers/attn/q/adapters/smola_0/pools/{pool}"


def test_every_router_records_per_layer_weights(model, recorded):
  _, reports = recorded
  n, length = model.num_image_tokens, model.num_image_tokens + PREFIX + SUFFIX
  shapes = {router: report["usage"].shape
            for router, report in reports.items() if "usage" in report}
  assert shapes == {
      **{_smola_path(p): (2, B, length, e) for p, e in SMOLA_POOLS.items()},
      "decoder/layers/mlp": (2, B, length, NUM_EXPERTS),
      "vit/layers/mlp": (1, B, n, NUM_EXPERTS),
      "connector/mlp": (B, n, NUM_EXPERTS),
  }


def test_smola_usage_is_each_tokens_combine_weight_per_expert(model, batch,
                                                              recorded):
  """Layer 0's recorded weights equal softmax over all slots of the cosine
  logits of the layer's q input, summed per expert, on served tokens."""
  _, reports = recorded
  tokens, _, _ = sequence_layout(model.num_image_tokens, batch["mask_ar"],
                                 batch["mask_input"])
  graphdef, state = nnx.split(model.decoder.layers)
  layer0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

  @nnx.jit
  def q_input(model, layer0, image, text):
    image, _ = model.embed_image(image)  # No instance routers here.
    x = jnp.concatenate([image, model.decoder.embed(text)], axis=1)
    return layer0.pre_attn_norm(x)

  q_input = np.asarray(q_input(model, layer0, batch["image"], batch["text"]))
  unit = lambda v, axis: v / np.sqrt(np.sum(v * v, axis, keepdims=True) + 1e-6)
  serves = dict(text=tokens.is_text, image=tokens.is_image,
                all=tokens.valid)
  for name, pool in layer0.attn.q.adapters["smola_0"].pools.items():
    phi = np.asarray(pool.phi[...])                    # [d, n, p]
    logits = np.einsum("btd,dnp->btnp", unit(q_input, -1),
                       float(pool.scale[...]) * unit(phi, 0))
    flat = logits.reshape(*logits.shape[:2], -1)
    combine = np.exp(flat - flat.max(-1, keepdims=True))
    combine = (combine / combine.sum(-1, keepdims=True)).reshape(logits.shape)
    want = combine.sum(-1) * np.asarray(serves[name])[..., None]
    got = np.asarray(reports[_smola_path(name)]["usage"])
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    # Layer 1 has its own weights (the stack is not one layer repeated).
    assert not np.allclose(got[1], got[0], atol=1e-3)


def test_sparse_usage_is_the_renormalised_top_k_gates(model, batch, recorded):
  """The connector's router (outside any stack) on the ViT's output: the
  top-2 of its softmax, divided by their sum, on every image token."""
  _, reports = recorded
  tokens = layers.TokenInfo.image(B, model.num_image_tokens)
  features, _ = nnx.jit(lambda vit, image: vit(image, tokens))(
      model.vit, batch["image"])
  logits = np.asarray(features) @ np.asarray(model.connector.mlp.router[...])
  top = np.argsort(-logits, axis=-1)[..., :TOP_K]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.zeros_like(probs)
  np.put_along_axis(want, top, np.take_along_axis(probs, top, -1), -1)
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(reports["connector/mlp"]["usage"], want,
                             atol=1e-5)
  # Decoder: exactly top_k experts per real token, none for padding.
  decoder = np.asarray(reports["decoder/layers/mlp"]["usage"])
  valid = np.asarray(sequence_layout(model.num_image_tokens, batch["mask_ar"],
                                     batch["mask_input"])[0].valid)
  valid = np.broadcast_to(valid, decoder.shape[:-1])
  np.testing.assert_array_equal(np.sum(decoder > 0, -1), TOP_K * valid)
  np.testing.assert_allclose(decoder.sum(-1), valid, atol=1e-6)


def test_not_recording_adds_nothing(model, batch):
  outputs = _forward(model, batch, record=False, shapes_only=True)
  recording = _forward(model, batch, record=True, shapes_only=True)
  routed = ["connector/mlp", "decoder/layers/mlp", "vit/layers/mlp"]
  assert sorted(outputs[1]) == routed
  assert all(set(report) == {"routing"} and
             isinstance(report["routing"], MoEAux)
             for report in outputs[1].values())
  # Recording only adds the usage reports.
  without_usage = {router: {name: value for name, value in report.items()
                            if name != "usage"}
                   for router, report in recording[1].items()}
  without_usage = {router: report for router, report in without_usage.items()
                   if report}
  assert jax.tree.structure(outputs) == jax.tree.structure(
      (recording[0], without_usage))


def test_analyze_mode_writes_usage_json_and_plots(synthetic_data_dir,
                                                  tmp_path):
  """A short run of the tiny model with SMoLA pools, then --mode=analyze:
  one PNG per router, means over the served tokens of the real examples
  (the last batch of 3 holds one real example and two padding rows)."""
  tasks = ["synthetic_vqa", "synthetic_ocr"]
  arg = "configs/mix.py:preset=tiny"
  config = config_lib.load_config_file(arg)
  config.model.decoder.depth = 2
  config.experts = _config().experts[:1]  # SMoLA; sparse MoE compiles slowly.
  config.data.tfds_data_dir = str(synthetic_data_dir)
  config.data.shuffle_buffer = 64
  config.train.update(dict(steps=1, batch_size=4, log_every=1,
                           warmup_steps=0))
  config.eval.update(dict(at_end=False, tasks=tasks, batch_size=3,
                          max_examples=4))
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))

  result = subprocess.run(
      [sys.executable, "-m", "omnismola.main", f"--config={arg}",
       f"--workdir={workdir}", "--mode=analyze",
       f"--config.data.tfds_data_dir={synthetic_data_dir}",
       f"--config.eval.tasks=({tasks[0]!r}, {tasks[1]!r})",
       "--config.eval.batch_size=3", "--config.eval.max_examples=4"],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  for i, task in enumerate(tasks, 1):
    assert f"Analyzing {task} ({i}/2)." in result.stdout
  written = [line.split(" ", 1)[1] for line in result.stdout.splitlines()
             if line.startswith("Wrote ")]
  with open(workdir / "analysis" / "usage.json") as f:
    usage = json.load(f)
  routers = usage["routers"]
  assert sorted(routers) == sorted(map(_smola_path, SMOLA_POOLS))
  assert sorted(written) == sorted(
      [str(workdir / "analysis" / "usage.json")] +
      [str(workdir / "analysis" / (r.replace("/", ".") + ".png"))
       for r in routers])
  for path in written[1:]:
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0

  # What the served-token counts must be: the real examples' tokens.
  vit = config.model.vit
  image_tokens = 4 * (vit.image_size // vit.patch_size)**2
  text = {}
  for task in tasks:
    rows = next(pipeline.make_labelled_batches(config.data, task, batch_size=4,
                                               max_examples=4))
    real = rows["mask_input"] == 1
    text[task] = dict(prefix=int(np.sum(real & (rows["mask_ar"] == 0))),
                      suffix=int(np.sum(real & (rows["mask_ar"] == 1))))
  for name, router in routers.items():
    pool = name.rsplit("/", 1)[1]
    for task in tasks:
      want = dict(image=image_tokens if pool != "text" else 0,
                  **{m: n if pool != "image" else 0
                     for m, n in text[task].items()})
      assert router["served_tokens"][task] == {
          m: [n, n] for m, n in want.items()}, (name, task)
      # Means over served tokens: each layer's sum to 1 over experts.
      np.testing.assert_allclose(np.sum(router["by_task"][task], -1), 1,
                                 rtol=1e-5)
    for modality, means in router["by_modality"].items():
      if pool == "text" and modality == "image" or (
          pool == "image" and modality != "image"):
        assert means == [[None] * router["experts"]] * 2  # Never served.
      else:
        np.testing.assert_allclose(np.sum(means, -1), 1, rtol=1e-5)
