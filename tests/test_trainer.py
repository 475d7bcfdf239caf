"""The trainer end to end on a small model: train, resume, evaluate, init."""
import json
import os

import jax
import numpy as np
import pytest

from omnismola import config_lib
from omnismola.train import init as init_lib
from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import trainer


def _config(data_dir, **train):
  c = config_lib.load_config_file("configs/mix.py:experts_per_pool=2,rank=2")
  c.model.vit.width, c.model.vit.depth, c.model.vit.mlp_dim = 32, 1, 64
  c.model.vit.num_heads = 2
  c.model.decoder.update(dict(width=32, depth=1, num_heads=2, head_dim=16,
                              mlp_dim=64))
  c.data.tfds_data_dir = str(data_dir)
  c.data.shuffle_buffer = 64
  c.train.update(dict(steps=4, batch_size=8, log_every=1, checkpoint_every=2,
                      warmup_steps=0, schedule="constant"))
  c.train.update(train)
  c.eval.update(dict(batch_size=8, max_examples=8, max_new_tokens=6,
                     tasks=("synthetic_vqa", "synthetic_ocr")))
  return c


def tiny_config(data_dir=None, **train):
  """The `tiny` preset without experts: the trainer's own logic, compiled fast.

  (Expert layers multiply compile time; their tests live elsewhere.)
  """
  c = config_lib.load_config_file("configs/mix.py:preset=tiny")
  c.experts = []
  c.model.vit.image_size, c.model.vit.patch_size = 64, 16  # The data's size.
  c.data.shuffle_buffer = 64
  if data_dir is not None:
    c.data.tfds_data_dir = str(data_dir)
  c.train.update(dict(steps=4, batch_size=8, log_every=1, checkpoint_every=2,
                      warmup_steps=0, schedule="constant"))
  c.train.update(train)
  c.eval.at_end = False
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_train_resume_and_evaluate(synthetic_data_dir, tmp_path):
  straight = tmp_path / "straight"
  results = trainer.train_and_evaluate(_config(synthetic_data_dir, steps=6),
                                       str(straight))
  assert set(results) == {"synthetic_vqa", "synthetic_ocr"}
  assert results["synthetic_vqa"]["metric"] == "vqa_accuracy"
  assert results["synthetic_vqa"]["num_examples"] == 8
  with open(straight / "eval" / "metrics_6.json") as f:
    assert json.load(f)["step"] == 6
  losses = _losses(straight)
  assert sorted(losses) == list(range(1, 7))
  assert all(np.isfinite(v) for v in losses.values())

  # Stop after 4 steps, then run the same command with more steps: it resumes
  # from the checkpoint (data position included) and logs the same losses.
  # (A constant schedule, so that the shorter first leg trains identically.)
  resumed = tmp_path / "resumed"
  trainer.train_and_evaluate(_config(synthetic_data_dir, steps=4,
                                     checkpoint_every=4), str(resumed))
  trainer.train_and_evaluate(_config(synthetic_data_dir, steps=6),
                             str(resumed))
  again = _losses(resumed)
  assert sorted(again) == list(range(1, 7))
  np.testing.assert_allclose([again[s] for s in (5, 6)],
                             [losses[s] for s in (5, 6)], rtol=1e-5)


@pytest.mark.slow
def test_init_from_another_run_loads_matching_parameters(synthetic_data_dir,
                                                         tmp_path):
  first = tmp_path / "first"
  trainer.train_and_evaluate(_config(synthetic_data_dir, steps=2),
                             str(first))
  c = _config(synthetic_data_dir, steps=1)
  c.eval.at_end = False
  c.init.checkpoint = str(first)
  c.experts = list(c.experts) + [dict(kind="lora", targets=r"connector/.*",
                                      rank=2)]
  mesh = partitioning.make_mesh(dict(c.mesh))
  init_fn, abstract, _ = trainer.create_state(
      c, mesh, optim.make_optimizer(c.train))
  fresh = init_fn(jax.random.key(c.seed))
  loaded = init_lib.load_partial(str(first), fresh, abstract)
  embed = loaded.params["decoder"]["embedder"]["embedding"]
  assert not np.allclose(embed, fresh.params["decoder"]["embedder"]
                         ["embedding"])
  lora_b = loaded.params["connector"]["proj"]["adapters"]["lora_1"]["b"]
  np.testing.assert_array_equal(lora_b, 0)  # New adapters start fresh.


def test_trainable_regex_freezes_the_rest(synthetic_data_dir):
  c = _config(synthetic_data_dir)
  c.train.trainable = r".*/adapters/.*"
  mesh = partitioning.make_mesh(dict(c.mesh))
  _, abstract, _ = trainer.create_state(c, mesh,
                                        optim.make_optimizer(c.train))
  flat = lambda t: ["/".join(str(k.key) for k in p)
                    for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
  assert flat(abstract.params) and all("adapters" in p
                                       for p in flat(abstract.params))
  assert not any("adapters" in p for p in flat(abstract.frozen))
  c.train.trainable = r"nothing"
  with pytest.raises(ValueError, match="matches no parameter"):
    trainer.create_state(c, mesh, optim.make_optimizer(c.train))


def test_the_run_writes_its_config_and_prints_what_it_changed_once(
    synthetic_data_dir, tmp_path, capsys):
  c = tiny_config(synthetic_data_dir, steps=2, checkpoint_every=2)
  trainer.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["train"]["steps"] == 2 and saved["experts"] == []
  assert saved["model"]["vit"]["image_size"] == 64
  printed = capsys.readouterr()
  lines = [l for l in printed.err.splitlines() if l.startswith("Config: ")]
  assert len(lines) == 1, lines
  assert lines[0].startswith("Config: model: tiny; experts: none; ")
  assert "; train.steps=2;" in lines[0] and "eval.at_end=False" in lines[0]
  assert str(tmp_path / "config.json") in lines[0]
  assert "Config: " not in printed.out


def test_a_bad_config_stops_the_run_before_anything_is_written(tmp_path):
  c = tiny_config(tmp_path / "tfds", microbatches=3)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="train.microbatches must be >= 1 and "
                     "divide train.batch_size, got 3"):
    trainer.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()
