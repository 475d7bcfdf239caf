"""Packing: the packer's rows, packed rows in the model (every example
computes as it would alone), the train step, and the packed train stream."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax import nnx

from omnismola import build
from omnismola import config_lib
from omnismola import row_layout
from omnismola import schema
from omnismola.data import packing
from omnismola.data import pipeline
from omnismola.experts import routing
from omnismola.models import presets
from omnismola.models.connectors import MoVEConfig
from omnismola.models.vit import ViTConfig
from omnismola.models.vlm import VLM, sequence_layout
from omnismola.train import partitioning
from omnismola.train import trainer
import checks
from test_trainer import tiny_config
from test_trainer_step import _setup

# --- The packer --------------------------------------------------------------


def _first_fit_reference(lengths, max_examples, text_length):
  """Plain-Python first fit: (row, slot, offset) per example."""
  rows, placed = [], []
  for n in lengths:
    for r, (used, count) in enumerate(rows):
      if used + n <= text_length and count < max_examples:
        break
    else:
      r = len(rows)
      rows.append((0, 0))
    used, count = rows[r]
    placed.append((r, count, used))
    rows[r] = (used + n, count + 1)
  return placed


@pytest.mark.parametrize("seed, max_examples, text_length",
                         [(0, 2, 16), (1, 3, 16), (2, 4, 40), (3, 3, 9)])
def test_first_fit_matches_a_python_reference(seed, max_examples, text_length):
  lengths = np.random.default_rng(seed).integers(1, min(text_length, 12) + 1,
                                                 size=40)
  row, slot, offset = packing.first_fit(
      tf.constant(lengths, tf.int32), max_examples=max_examples,
      text_length=text_length)
  got = list(zip(row.numpy().tolist(), slot.numpy().tolist(),
                 offset.numpy().tolist()))
  assert got == _first_fit_reference(lengths, max_examples, text_length)


def _examples(lengths, prefix_lengths, width=10, image_size=2, seed=0):
  """Converter-style train examples: [prefix, suffix, padding] of `width`."""
  rng = np.random.default_rng(seed)
  count = len(lengths)
  text = np.zeros((count, width), np.int32)
  mask_ar, mask_input = np.zeros_like(text), np.zeros_like(text)
  for k, (n, p) in enumerate(zip(lengths, prefix_lengths)):
    text[k, :n] = rng.integers(3, 259, n)
    mask_ar[k, p:n] = 1
    mask_input[k, :n] = 1
  return dict(text=text, mask_ar=mask_ar, mask_loss=mask_ar.copy(),
              mask_input=mask_input,
              image=rng.uniform(-1, 1, (count, image_size, image_size, 3)
                                ).astype(np.float32),
              task_id=rng.integers(0, 3, count).astype(np.int32),
              over_length=rng.integers(0, 2, count).astype(np.int32))


def test_grouped_softmax_matches_one_softmax_per_group():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 9, 3)).astype(np.float32)
  logits[1, :3] += 200.0  # Group 1 of row 1 far above the others.
  group = np.array([[1, 1, 2, 2, 2, 0, 1, 3, 0], [1, 1, 1, 2, 2, 0, 0, 0, 0]])
  groups = group[..., None] == np.arange(1, 4)
  got = np.asarray(routing.grouped_softmax(jnp.asarray(logits),
                                           jnp.asarray(groups)))
  for b in range(2):
    for g in range(4):
      members = group[b] == g
      want = (0.0 if g == 0 else
              jax.nn.softmax(logits[b, members], axis=0))
      np.testing.assert_allclose(got[b, members], np.broadcast_to(
          want, got[b, members].shape), rtol=1e-6, atol=1e-7)


def test_pack_window_places_every_example_whole():
  lengths, prefixes = [5, 3, 8, 2, 2, 4, 7], [2, 1, 6, 1, 1, 2, 3]
  examples = _examples(lengths, prefixes)
  rows = {k: v.numpy() for k, v in packing.pack_window(
      {k: tf.constant(v) for k, v in examples.items()}, max_examples=2,
      text_length=8).items()}
  placed = _first_fit_reference(lengths, 2, 8)
  assert rows["text"].shape == (5, 8)
  assert rows["image"].shape == (5, 2, 2, 2, 3)
  for k, (r, slot, offset) in enumerate(placed):
    span = slice(offset, offset + lengths[k])
    for key in ("text", "mask_ar", "mask_loss", "mask_input"):
      np.testing.assert_array_equal(rows[key][r, span],
                                    examples[key][k, :lengths[k]])
    assert (rows["segment_ids"][r, span] == slot + 1).all()
    np.testing.assert_array_equal(rows["image"][r, slot], examples["image"][k])
    assert rows["task_id"][r, slot] == examples["task_id"][k]
    assert rows["over_length"][r, slot] == examples["over_length"][k]
  # Everything else is padding: no token, mask or segment; empty slots are
  # zero images of task 0 with nothing over-length.
  real = rows["segment_ids"] > 0
  assert real.sum() == sum(lengths)
  for key in ("text", "mask_ar", "mask_loss", "mask_input"):
    assert (rows[key][~real] == 0).all()
  filled = {(r, slot) for r, slot, _ in placed}
  for r in range(5):
    for slot in range(2):
      if (r, slot) not in filled:
        assert not rows["image"][r, slot].any()
        assert rows["task_id"][r, slot] == rows["over_length"][r, slot] == 0


def test_an_example_longer_than_a_row_fails_clearly():
  examples = _examples([9], [3])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="packing.text_length must be >= prefix"):
    packing.pack_window({k: tf.constant(v) for k, v in examples.items()},
                        max_examples=2, text_length=8)


def _data_config(**packing_fields):
  return schema.data_config(feature_lengths=dict(prefix=6, suffix=4),
                            packing=dict(schema.data_config().packing,
                                         **packing_fields))


def test_row_layout_defaults_and_checks():
  assert row_layout.row_layout(_data_config()) == row_layout.RowLayout(
      images=1, text_length=10, window=1, packed=False)
  assert not row_layout.row_layout(_data_config(examples=1)).packed
  assert row_layout.row_layout(_data_config(examples=3)) == (
      row_layout.RowLayout(images=3, text_length=10, window=64, packed=True))
  for fields, message in [
      (dict(examples=3, text_length=9), "packing.text_length must be 0 or at "
       "least one example's text"),
      (dict(examples=3, window=2), "packing.window must be at least"),
      (dict(examples=-1), "packing.examples must be >= 0"),
      (dict(examples=2, length=20), "packing.length is not a field")]:
    config = schema.base_config("tiny")
    config.data = _data_config(**fields)
    with pytest.raises(ValueError, match=message):
      schema.check(config)
  shapes = row_layout.batch_shapes(
      row_layout.row_layout(_data_config(examples=3, text_length=24)), 8, 16)
  assert shapes["image"] == ((8, 3, 16, 16, 3), "float32")
  assert shapes["segment_ids"] == shapes["text"] == ((8, 24), "int32")
  assert shapes["task_id"] == ((8, 3), "int32")


def test_aot_check_takes_packed_rows():
  config = tiny_config()
  config.data.packing.examples = 3
  batch = trainer.abstract_batch(
      config, partitioning.make_mesh(dict(config.mesh)))
  assert batch["image"].shape == (8, 3, 64, 64, 3)
  assert batch["segment_ids"].shape == batch["text"].shape == (8, 80)
  assert batch["task_id"].shape == (8, 3)
  assert batch["segment_ids"].dtype == jnp.int32


# --- The model ---------------------------------------------------------------


def test_segments_see_only_themselves_and_restart_positions():
  # Row 0: example 1 (2 prefix + 1 suffix ids), example 2 (1 + 2), padding;
  # row 1: one example in slot 1 of 2, slot 2 empty.
  n = 2  # Image tokens per image.
  mask_ar = jnp.array([[0, 0, 1, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]])
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0]])
  tokens, mask, positions = sequence_layout(
      n, mask_ar, segment_ids > 0, segment_ids, num_images=2)
  np.testing.assert_array_equal(  # The padding's position is unused.
      positions[0, :10], [0, 1, 0, 1, 2, 3, 4, 2, 3, 4])
  np.testing.assert_array_equal(tokens.valid[1, :4], [1, 1, 0, 0])
  # Image 2 and example 2 in row 0: image tokens 2-3 and text 7-9.
  seg = np.array([1, 1, 2, 2, 1, 1, 1, 2, 2, 2, 0])
  visible = np.asarray(mask[0])
  assert not visible[seg == 1][:, seg == 2].any()
  assert not visible[seg == 2][:, seg == 1].any()
  # Within example 2: image + prefix bidirectional, suffix causal.
  example_2 = visible[np.ix_(seg == 2, seg == 2)]
  np.testing.assert_array_equal(example_2, [[1, 1, 1, 0, 0],
                                            [1, 1, 1, 0, 0],
                                            [1, 1, 1, 0, 0],
                                            [1, 1, 1, 1, 0],
                                            [1, 1, 1, 1, 1]])
  assert not visible[-1].any() and not visible[:, -1].any()  # Padding.


SMOLA_AND_ROUTED = [
    dict(kind="smola", targets=r"decoder/layers/\d+/mlp/(gate|up|down)",
         pools=dict(text=3, image=2, all=2), rank=2),
    dict(kind="sparse_lora", targets=r"decoder/layers/\d+/attn/(q|v)",
         num_experts=4, rank=2, top_k=2, global_expert=True),
    dict(kind="sparse_lora", targets=r"vit/layers/\d+/mlp", num_experts=3,
         rank=2),
    dict(kind="lora", targets=r"connector/proj", rank=2),
]
MODELS = {
    "smola_and_instance_routing": (dict(decoder_depth=2), SMOLA_AND_ROUTED),
    "sliding_window": (dict(decoder_depth=2, decoder_sliding_window=3), []),
    "move": (dict(connector="move",
                  extra_vits=(ViTConfig(image_size=12, patch_size=4, width=24,
                                        depth=1, num_heads=3, mlp_dim=48),),
                  move=MoVEConfig(num_tokens=4, adt_depth=1)), []),
}


def _random_model(overrides, experts) -> VLM:
  """A tiny VLM with every parameter random, adapters included: built and
  randomised in one jitted call (eagerly, every initializer and draw
  dispatches op by op)."""
  config = presets.get_preset("tiny", **overrides)
  plan = build.expert_plan(experts, config)
  return nnx.jit(lambda: checks.randomized(
      VLM(config, plan=plan, rngs=nnx.Rngs(0)), scale=0.3))()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_examples_compute_as_they_would_alone(name):
  overrides, experts = MODELS[name]
  model = _random_model(overrides, experts)
  size = model.config.vit.image_size
  lengths, prefixes = [5, 3, 8, 2, 6, 4, 7], [2, 1, 6, 1, 3, 2, 3]
  examples = _examples(lengths, prefixes, width=8, image_size=size)
  # Jitted, as the model runs in training and decoding (eagerly, MoVE's
  # op-by-op dispatch took longer than compiling).
  single = nnx.jit(lambda m, *args: m(*args))(
      model, *(jnp.asarray(examples[k]) for k in
               ("image", "text", "mask_ar", "mask_input")))
  rows = packing.pack_window({k: tf.constant(v) for k, v in examples.items()},
                             max_examples=3, text_length=12)
  rows = {k: jnp.asarray(v.numpy()) for k, v in rows.items()}
  packed, _ = nnx.jit(lambda m, *args, **kw: m.forward(*args, **kw))(
      model, rows["image"], rows["text"], rows["mask_ar"], rows["mask_input"],
      segment_ids=rows["segment_ids"])
  for k, (r, _, offset) in enumerate(_first_fit_reference(lengths, 3, 12)):
    np.testing.assert_allclose(packed[r, offset:offset + lengths[k]],
                               single[k, :lengths[k]], rtol=2e-4, atol=2e-4)


def test_packed_rows_need_a_list_of_images():
  model = _random_model(dict(decoder_depth=1), [])
  text = jnp.ones((2, 6), jnp.int32)
  with pytest.raises(ValueError,
                     match=r"or \[B, M, H, W, 3\] for packed rows"):
    model.forward(jnp.zeros((2, 16, 16, 3)), text, 0 * text, text,
                  segment_ids=text)


# --- The train step ----------------------------------------------------------


# SMoLA's compile takes a minute on 2 cores: in the slow suite.
@pytest.mark.parametrize("experts", [
    "none", pytest.param("smola", marks=pytest.mark.slow)])
def test_a_packed_step_equals_the_unpacked_step_on_the_same_examples(experts):
  config = tiny_config()
  if experts == "smola":  # configs/mix.py's own SMoLA entry.
    config.experts = config_lib.load_config_file(
        "configs/mix.py:preset=tiny").experts
  # Plain SGD with lr 1: the parameter change is minus the gradient.
  state, step, _ = _setup(config, optax.sgd(1.0), num_tasks=3)
  lengths = [30, 12, 50, 9, 44, 20, 71, 16]
  prefixes = [10, 5, 40, 4, 20, 8, 48, 6]
  examples = _examples(lengths, prefixes, width=80, image_size=64)
  rows = {k: v.numpy() for k, v in packing.pack_window(
      {k: tf.constant(v) for k, v in examples.items()}, max_examples=3,
      text_length=96).items()}
  rows.pop("over_length")
  examples.pop("over_length")
  assert len(rows["text"]) < len(examples["text"])
  # Both batches need the same row count to share a mesh: pad the packed
  # one with empty rows (nothing valid, no examples).
  pad = len(examples["text"]) - len(rows["text"])
  rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
          for k, v in rows.items()}

  single, packed = step(state, examples), step(state, rows)
  assert int(packed[1]["examples"]) == int(single[1]["examples"]) == 8
  checks.assert_steps_match(packed, single, rtol=1e-5, atol=2e-5)


# --- The packed train stream -------------------------------------------------


def _stream_config(data_dir, examples=0):
  return schema.data_config(
      mixture="synthetic_mix", feature_lengths=dict(prefix=48, suffix=6),
      tfds_data_dir=str(data_dir), shuffle_buffer=60, truncation="truncate",
      packing=dict(examples=examples, text_length=0, window=16))


def _example_keys(batch) -> list[tuple]:
  """(image bytes, real text) of every example in a batch, in row order."""
  keys = []
  if "segment_ids" not in batch:
    for image, text, real in zip(batch["image"], batch["text"],
                                 batch["mask_input"]):
      keys.append((image.tobytes(), tuple(text[real == 1])))
    return keys
  for images, text, segments in zip(batch["image"], batch["text"],
                                    batch["segment_ids"]):
    for slot in range(images.shape[0]):
      if (segments == slot + 1).any():
        keys.append((images[slot].tobytes(),
                     tuple(text[segments == slot + 1])))
  return keys


def test_packed_stream_holds_the_unpacked_stream_and_resumes(
    synthetic_data_dir):
  unpacked = pipeline.make_train_iterator(
      _stream_config(synthetic_data_dir), global_batch_size=16, seed=3)
  examples = [key for _ in range(8) for key in _example_keys(next(unpacked))]
  make = lambda **kw: pipeline.make_train_iterator(
      _stream_config(synthetic_data_dir, examples=3), global_batch_size=4,
      seed=3, **kw)
  straight = make()
  batches = [next(straight) for _ in range(10)]
  batch = batches[0]
  assert batch["image"].shape == (4, 3, 64, 64, 3)
  assert batch["segment_ids"].shape == batch["text"].shape == (4, 54)
  assert batch["task_id"].shape == (4, 3)
  packed = [key for b in batches for key in _example_keys(b)]
  # Windows of 16 examples in stream order; rows in order of opening, so
  # each window's examples come out as a reordering of that window.
  assert len(packed) > 4 * 10 + 16
  for start in range(0, 4 * 10 // 16 * 16, 16):
    window = examples[start:start + 16]
    assert sorted(packed[start:start + 16]) == sorted(window)
  # Segments are contiguous and in slot order; every example fits its row.
  for b in batches:
    for segments in b["segment_ids"]:
      real = segments[segments > 0]
      assert (np.diff(real) >= 0).all() and real[0] == 1

  stopped = make()
  for _ in range(7):
    next(stopped)
  state = json.loads(json.dumps(stopped.get_state()))
  resumed = make(state=state)
  for want in batches[7:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert resumed.get_state() == straight.get_state()
  # A 6-id suffix truncates captions: counted per packed example's task.
  assert sum(straight.get_state()["over_length"]) > 0


def test_training_on_packed_rows_counts_examples(synthetic_data_dir,
                                                 tmp_path):
  config = tiny_config(synthetic_data_dir, steps=3)
  config.data.packing.examples = 3
  trainer.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "train_metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  tokens, _ = trainer.row_cost(config)
  assert tokens == 3 * 16 + 48 + 32  # Three images' tokens and the text.
  for r in records[1:]:  # The first step's rate is not measured (compile).
    assert np.isfinite(r["loss"])
    # Eight rows a step, more than one example in each.
    assert 8 < r["examples_per_step"] <= 24
    # The rate counts packed examples, not rows (which would give 8), and
    # 8 rows of 128 tokens (the rates' formulas: test_trainer_pod.py).
    assert r["examples_per_sec"] / r["steps_per_sec"] == pytest.approx(
        r["examples_per_step"])
    assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(8 * 128)
