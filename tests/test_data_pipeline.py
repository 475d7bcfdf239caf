"""Tasks, converter and pipeline on the small synthetic suite of conftest.py."""
import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import seqio
import tensorflow as tf

from omnismola import schema
from omnismola.data import converter
from omnismola.data import mixtures
from omnismola.data import pipeline
from omnismola.data import tasks
from omnismola.data.synthetic import builder
from omnismola.data.synthetic import scenes

P, S = 48, 32


def _config(data_dir, **overrides):
  return schema.data_config(**dict(dict(
      mixture="synthetic_mix", feature_lengths=dict(prefix=P, suffix=S),
      tfds_data_dir=str(data_dir), shuffle_buffer=60), **overrides))


def _hash(*arrays) -> str:
  return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                 for a in arrays)).hexdigest()


def _batch_hash(batch: dict) -> str:
  return _hash(*(batch[k] for k in sorted(batch)))


def _rows(batch: dict) -> list[str]:
  return [_hash(batch["image"][i], batch["text"][i])
          for i in range(len(batch["text"]))]


def test_importing_the_data_layer_hides_gpus_from_tensorflow():
  """On a CPU-only machine TF sees no GPU anyway, so check the call: in a
  fresh process, importing omnismola.data asks TF to see no GPU."""
  probe = textwrap.dedent("""
      import tensorflow as tf
      calls = []
      tf.config.set_visible_devices = lambda *args: calls.append(args)
      import omnismola.data
      assert calls == [([], "GPU")], calls
      """)
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert not tf.config.get_visible_devices("GPU")


def test_converter_masks_on_a_hand_example():
  example = {"image": tf.zeros([64, 64, 3]),
             "prefix": tf.constant([10, 11, 12]),
             "suffix": tf.constant([20, 21, 1])}
  out = {k: v.numpy() for k, v in converter.train_features(
      example, 4, prefix_length=4, suffix_length=4).items()}
  np.testing.assert_array_equal(out["text"], [10, 11, 12, 20, 21, 1, 0, 0])
  np.testing.assert_array_equal(out["mask_ar"], [0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["mask_loss"], [0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["mask_input"], [1, 1, 1, 1, 1, 1, 0, 0])
  assert out["task_id"] == 4 and out["text"].dtype == np.int32
  # Truncation: the prefix to 2 ids, the suffix to 2 (its EOS is lost).
  out = converter.train_features(example, 0, prefix_length=2, suffix_length=2)
  np.testing.assert_array_equal(out["text"].numpy(), [10, 11, 20, 21])
  np.testing.assert_array_equal(out["mask_loss"].numpy(), [0, 0, 1, 1])
  # The prompt: prefix only, padded to P, never causal.
  example["references"] = tf.constant([b"x"])
  out = converter.prompt_features(example, 2, prefix_length=5)
  np.testing.assert_array_equal(out["text"].numpy(), [10, 11, 12, 0, 0])
  np.testing.assert_array_equal(out["mask_ar"].numpy(), [0] * 5)
  np.testing.assert_array_equal(out["mask_input"].numpy(), [1, 1, 1, 0, 0])


def test_registered_tasks_and_mixture():
  assert tasks.get_vocabulary().vocab_size == 259
  assert tasks.VOCAB.encode("a") == [ord("a") + 3] and tasks.EOS_ID == 1
  assert mixtures.mixture_tasks("synthetic_mix") == [
      (f"synthetic_{t}", 1.0) for t in sorted(scenes.TASKS)]
  assert mixtures.mixture_tasks("synthetic_ocr") == [("synthetic_ocr", 1.0)]
  assert tasks.metric_of("synthetic_vqa") == "vqa_accuracy"
  assert tasks.metric_of("synthetic_captioning") == "cider"
  with pytest.raises(ValueError, match="neither a registered SeqIO mixture"):
    mixtures.mixture_tasks("nope")
  with pytest.raises(ValueError, match="unknown metric"):
    tasks.register_vl_task("bad", seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: None, splits=["train"]),
                           metric="bleu")


def test_task_output_features(synthetic_data_dir):
  pipeline.prepare(_config(synthetic_data_dir))  # Points SeqIO at the dir.
  ds = seqio.get_mixture_or_task("synthetic_ocr").get_dataset(
      sequence_length=None, split="validation", shuffle=False)
  for x in ds.take(4).as_numpy_iterator():
    word = x["suffix_pretokenized"].decode()
    assert x["prefix"].tolist() == tasks.VOCAB.encode("ocr")
    assert x["suffix"].tolist() == tasks.VOCAB.encode(word) + [tasks.EOS_ID]
    assert x["references"].tolist() == [word.encode()]
    assert x["image"].dtype == np.float32 and x["image"].shape == (64, 64, 3)
    assert x["image"].min() >= -1.0 and x["image"].max() <= 1.0


# A prompt fragment that only the examples of each task contain.
_TASK_PROMPTS = {
    "synthetic_captioning": "caption en", "synthetic_chartqa": " bar",
    "synthetic_counting": "how many", "synthetic_docqa": "what is the",
    "synthetic_ocr": "ocr", "synthetic_vqa": "answer en",
}


def test_train_batches_shapes_masks_and_task_tags(synthetic_data_dir):
  config = _config(synthetic_data_dir)
  names = pipeline.mixture_task_names(config)
  it = pipeline.make_train_iterator(config, global_batch_size=8, seed=0)
  batches = [next(it) for _ in range(8)]
  state = it.get_state()
  assert (state["batches_consumed"], state["shard"]) == (8, [0, 1])
  assert len(state["over_length"]) == 6
  for b in batches:
    assert set(b) == {"image", "text", "mask_ar", "mask_loss", "mask_input",
                      "task_id"}
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    for key in ("text", "mask_ar", "mask_loss", "mask_input"):
      assert b[key].shape == (8, P + S) and b[key].dtype == np.int32
    assert b["task_id"].shape == (8,) and b["task_id"].dtype == np.int32
    for row in range(8):
      text, inputs = b["text"][row], b["mask_input"][row]
      prefix = text[(b["mask_ar"][row] == 0) & (inputs == 1)]
      target = text[b["mask_loss"][row] == 1]
      n = inputs.sum()
      # Layout: [prefix, suffix ending in EOS, padding].
      np.testing.assert_array_equal(inputs, np.arange(P + S) < n)
      np.testing.assert_array_equal(text[n:], 0)
      np.testing.assert_array_equal(b["mask_ar"][row], b["mask_loss"][row])
      assert target[-1] == tasks.EOS_ID and len(prefix) + len(target) == n
      # The tag names the task the example came from.
      task = names[b["task_id"][row]]
      assert _TASK_PROMPTS[task] in pipeline.detokenize(prefix), task
  tags = np.concatenate([b["task_id"] for b in batches])
  assert set(tags) == set(range(6))  # Equal rates: 64 draws hit all six.


def test_train_iterator_is_seeded_and_resumes_exactly(synthetic_data_dir):
  # A short suffix truncates captions: the resumed counts must continue.
  config = _config(synthetic_data_dir, feature_lengths=dict(prefix=P,
                                                            suffix=6))
  make = lambda **kw: pipeline.make_train_iterator(
      config, global_batch_size=8, **kw)
  straight = make(seed=1)
  hashes = [_batch_hash(next(straight)) for _ in range(6)]
  assert [_batch_hash(next(make(seed=1)))] == hashes[:1]
  assert _batch_hash(next(make(seed=2))) != hashes[0]

  stopped = make(seed=1)
  for _ in range(3):
    next(stopped)
  state = json.loads(json.dumps(stopped.get_state()))  # As checkpointed.
  resumed = make(seed=1, state=state)
  assert [_batch_hash(next(resumed)) for _ in range(3)] == hashes[3:]
  assert resumed.get_state() == straight.get_state()
  assert resumed.get_state()["batches_consumed"] == 6
  assert sum(resumed.get_state()["over_length"]) > sum(state["over_length"])


def test_two_shards_are_disjoint_and_one_shard_reads_the_same(
    synthetic_data_dir, caplog):
  config = _config(synthetic_data_dir, mixture="synthetic_ocr")
  make = lambda shard, **kw: pipeline.make_train_iterator(
      config, global_batch_size=16, seed=0, shard_index=shard, shard_count=2,
      **kw)
  seen = []
  for shard in range(2):
    it = make(shard)
    # 12 batches of 8 draw 96 times from this shard's 32 examples (SeqIO
    # shuffles after repeating, so epochs blend): all 32, nothing else.
    rows = {h for _ in range(12) for h in _rows(next(it))}
    assert len(rows) == 32
    seen.append(rows)
  assert not seen[0] & seen[1]
  # Hosts that read one shard (they hold the same batch rows) must hand
  # make_array_from_process_local_data identical batches.
  assert _batch_hash(next(make(1))) == _batch_hash(next(make(1)))
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_train_iterator(config, global_batch_size=9, seed=0,
                                 shard_count=2)
  # Resuming another shard's position works, and says the data differs.
  state = make(0).get_state()
  with caplog.at_level("WARNING"):
    make(1, state=state)
  assert "from shard (0, 2)" in caplog.text


def _stream(config, batches: int) -> tuple[list[dict], dict]:
  """`batches` train batches of 8 rows, and the iterator's state after."""
  it = pipeline.make_train_iterator(config, global_batch_size=8, seed=3)
  return [next(it) for _ in range(batches)], it.get_state()


def test_truncation_policies_and_exact_over_length_counts(synthetic_data_dir):
  # OCR words are 3-8 bytes: with the EOS, about half exceed a 5-id suffix.
  config = lambda policy: _config(
      synthetic_data_dir, mixture="synthetic_ocr", truncation=policy,
      feature_lengths=dict(prefix=P, suffix=5))
  cut, cut_state = _stream(config("truncate"), 10)
  rows = [(_hash(b["image"][i]), b["text"][i][b["mask_loss"][i] == 1])
          for b in cut for i in range(8)]
  # Truncated rows are the ones whose 5 target ids lost their EOS.
  truncated = [len(t) == 5 and t[-1] != tasks.EOS_ID for _, t in rows]
  assert 0 < sum(truncated) < len(rows)
  assert cut_state["over_length"] == [sum(truncated)]

  # "drop" reads the same task stream and skips exactly the truncated rows;
  # each dropped example is counted once, by the next kept one.
  kept, drop_state = _stream(config("drop"), 3)
  kept_rows = [_hash(b["image"][i]) for b in kept for i in range(8)]
  fitting = [image for (image, _), cut in zip(rows, truncated) if not cut]
  assert kept_rows == fitting[:24]
  last_kept = [i for i, cut in enumerate(truncated) if not cut][23]
  assert drop_state["over_length"] == [sum(truncated[:last_kept])]
  for b in kept:  # Whole targets only.
    for text, loss in zip(b["text"], b["mask_loss"]):
      assert text[loss == 1][-1] == tasks.EOS_ID

  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"Task synthetic_ocr: an example is longer"):
    _stream(config("error"), 6)
  # An unknown policy is the schema's to refuse (tests/test_schema.py).


def test_over_length_metrics_count_each_shard_once(synthetic_data_dir):
  config = _config(synthetic_data_dir, mixture="synthetic_mix")
  names = pipeline.mixture_task_names(config)
  shard = lambda index, counts: {"batches_consumed": 4, "shard": [index, 2],
                                 "over_length": counts}
  # Processes 0 and 1 read shard 0 (replicas), process 2 reads shard 1.
  states = [shard(0, [1, 0, 2, 0, 0, 3]), shard(0, [1, 0, 2, 0, 0, 3]),
            shard(1, [0, 5, 0, 0, 0, 1])]
  assert pipeline.over_length_metrics(config, states) == {
      f"data/{name}/truncated": n for name, n in zip(names,
                                                     [1, 5, 2, 0, 0, 4])}
  config.truncation = "drop"
  assert set(pipeline.over_length_metrics(config, states)) == {
      f"data/{name}/dropped" for name in names}
  config.truncation = "error"
  assert pipeline.over_length_metrics(config, states) == {}


def test_eval_batches_are_padded_and_deterministic(synthetic_data_dir):
  config = _config(synthetic_data_dir)
  eval_sets = pipeline.make_eval_sets(config, batch_size=6,
                                      tasks=["synthetic_vqa"])
  (vqa,) = eval_sets
  assert (vqa.name, vqa.metric) == ("synthetic_vqa", "vqa_accuracy")
  assert vqa.task_id == pipeline.mixture_task_names(config).index(
      "synthetic_vqa")
  batches = list(vqa.batches())
  assert len(batches) == 3  # 16 examples in batches of 6.
  assert [b["example_mask"].tolist() for b in batches] == [
      [1] * 6, [1] * 6, [1] * 4 + [0] * 2]
  last = batches[-1]
  assert [len(r) for r in last["references"]] == [10] * 4 + [0] * 2
  for b in batches:
    assert b["text"].shape == (6, P) and b["image"].shape == (6, 64, 64, 3)
    assert not b["mask_ar"].any() and np.all(b["task_id"] == vqa.task_id)
    assert "mask_loss" not in b
  # Prompts are validation prompts, with the references of that example.
  validation = {}
  for i in range(16):
    e = scenes.make_example("vqa", "validation", i)
    validation.setdefault(e["prefix"], []).append(e["references"])
  for b in batches:
    for row in np.nonzero(b["example_mask"])[0]:
      prompt = pipeline.detokenize(b["text"][row][b["mask_input"][row] == 1])
      assert b["references"][row] in validation[prompt]
  again = list(vqa.batches())
  assert [_hash(b["text"], b["image"]) for b in again] == [
      _hash(b["text"], b["image"]) for b in batches]


def test_eval_max_examples_and_processes(synthetic_data_dir):
  config = _config(synthetic_data_dir)
  (ocr,) = pipeline.make_eval_sets(config, batch_size=4, max_examples=5,
                                   tasks=["synthetic_ocr"])
  assert [b["example_mask"].sum() for b in ocr.batches()] == [4, 1]
  # 13 examples on 2 processes: 7 and 6, so both yield 2 batches of 6.
  per_process = []
  for process in range(2):
    (ocr,) = pipeline.make_eval_sets(
        config, batch_size=6, max_examples=13, tasks=["synthetic_ocr"],
        process_index=process, process_count=2)
    per_process.append(list(ocr.batches()))
  assert [[b["example_mask"].sum() for b in p] for p in per_process] == [
      [6, 1], [6, 0]]
  rows = [set(_hash(b["image"][i]) for b in p
              for i in np.nonzero(b["example_mask"])[0]) for p in per_process]
  assert len(rows[0]) == 7 and len(rows[1]) == 6 and not rows[0] & rows[1]
  with pytest.raises(ValueError, match="not in the mixture"):
    pipeline.make_eval_sets(config, batch_size=4, tasks=["synthetic_nope"])


def test_prepare_builds_missing_data_once(tmp_path, monkeypatch):
  monkeypatch.setitem(builder.SPLIT_SIZES, "train", 8)
  monkeypatch.setitem(builder.SPLIT_SIZES, "validation", 4)
  config = _config(tmp_path / "tfds", mixture="synthetic_counting")
  pipeline.prepare(config)
  info = tmp_path / "tfds/omnismola_synthetic/counting/1.0.0/dataset_info.json"
  built = info.stat().st_mtime_ns
  pipeline.prepare(config)
  assert info.stat().st_mtime_ns == built
  (counting,) = pipeline.make_eval_sets(config, batch_size=8)
  assert [b["example_mask"].sum() for b in counting.batches()] == [4]


def test_user_task_module(tmp_path, monkeypatch):
  (tmp_path / "my_vl_tasks.py").write_text(textwrap.dedent("""
      import numpy as np
      import seqio
      import tensorflow as tf
      from omnismola.data import tasks

      def numbers(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices(dict(
            image=np.full((12, 64, 64, 3), 255, np.uint8),
            question=[f"say {i}" for i in range(12)],
            answer=[str(i) for i in range(12)]))

      @seqio.map_over_dataset
      def to_raw(x):
        return dict(image=x["image"], prefix=x["question"],
                    suffix=x["answer"], references=[x["answer"]])

      tasks.register_vl_task(
          "my_numbers", seqio.FunctionDataSource(
              numbers, splits=["train", "validation"]),
          metric="exact_match", preprocessors=[to_raw])
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  config = _config(tmp_path, mixture="my_numbers",
                   task_modules=("my_vl_tasks",))
  pipeline.prepare(config)  # Nothing to build for a non-TFDS source.
  assert not pipeline.chance_levels(config)  # Known for synthetic tasks only.
  batch = next(pipeline.make_train_iterator(config, global_batch_size=4,
                                            seed=0))
  assert np.all(batch["image"] == 1.0) and np.all(batch["task_id"] == 0)
  row = batch["text"][0]
  prompt = pipeline.detokenize(row[batch["mask_ar"][0] == 0])
  answer = pipeline.detokenize(row[batch["mask_loss"][0] == 1])
  assert prompt == f"say {answer}"
  (numbers,) = pipeline.make_eval_sets(config, batch_size=8)
  assert numbers.metric == "exact_match"
  batches = list(numbers.batches())
  assert [r for b in batches for r in b["references"] if r][:3] == [
      ["0"], ["1"], ["2"]]


def test_chance_levels(synthetic_data_dir):
  levels = pipeline.chance_levels(_config(synthetic_data_dir,
                                          mixture="synthetic_ocr"))
  assert list(levels) == ["synthetic_ocr"] and 0 <= levels["synthetic_ocr"] < 50
  all_levels = pipeline.chance_levels(_config(synthetic_data_dir))
  assert set(all_levels) == {f"synthetic_{t}" for t in scenes.TASKS}
  assert all(0 <= v <= 100 for v in all_levels.values())
