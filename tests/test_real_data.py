"""The real benchmarks' builders and tasks, on tiny copies of their files.

Each writer below lays out a few examples exactly as the official release
does (same file names, same JSON fields) and returns the (prefix, references)
the task must yield on the split the pipeline evaluates.
"""
import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from omnismola import schema
from omnismola.data import mixtures
from omnismola.data import pipeline
from omnismola.data import tasks
from omnismola.data.benchmarks import images
from omnismola.data.benchmarks import suite
from omnismola.data.synthetic import builder as synthetic_builder


def _image(path, size=(24, 16), color=(200, 30, 30)):
  """Writes a small image; the format follows the file's extension."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color).save(path)


def _json(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))


def _answers(*words):
  """Ten VQA answers, cycling through `words`."""
  return [words[i % len(words)] for i in range(10)]


def write_coco_captions(root):
  for split in ("train", "val"):
    ids = [1, 2] if split == "train" else [7, 9]
    _json(root / f"annotations/captions_{split}2017.json", {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
        "annotations": [{"id": 10 * i + k, "image_id": i,
                         "caption": f"{split} photo {i} take {k} "}
                        for i in ids for k in range(2)]})
    for i in ids:
      _image(root / f"{split}2017/{i:012d}.jpg")
  return [("caption en", [f"val photo {i} take {k}" for k in range(2)])
          for i in (7, 9)]


def write_textcaps(root):
  for split, ids in (("train", ["a1", "a2"]), ("val", ["b1"])):
    _json(root / f"TextCaps_0.1_{split}.json", {"data": [
        {"image_id": i, "image_name": i, "caption_str": f"sign {i} {k}",
         "caption_id": k, "set_name": split}
        for i in ids for k in range(3)]})
    for i in ids:
      _image(root / f"train_images/{i}.jpg")
  return [("caption en", ["sign b1 0", "sign b1 1", "sign b1 2"])]


def _write_coco_vqa(root, prefix):
  for subset, ids in (("train2014", [1, 2]), ("val2014", [3, 4])):
    _json(root / f"{prefix}OpenEnded_mscoco_{subset}_questions.json", {
        "questions": [{"question_id": 100 + i, "image_id": i,
                       "question": f"what is {i}?"} for i in ids]})
    _json(root / f"{prefix.replace('OpenEnded_', '')}mscoco_{subset}_"
          "annotations.json", {
              "annotations": [{
                  "question_id": 100 + i, "image_id": i,
                  "multiple_choice_answer": "yes",
                  "answers": [{"answer": a, "answer_id": k + 1,
                               "answer_confidence": "yes"}
                              for k, a in enumerate(_answers("yes", f"n{i}"))]
              } for i in ids]})
    for i in ids:
      _image(root / f"{subset}/COCO_{subset}_{i:012d}.jpg")
  return [(f"answer en what is {i}?", _answers("yes", f"n{i}"))
          for i in (3, 4)]


def write_vqav2(root):
  return _write_coco_vqa(root, "v2_")


def write_okvqa(root):
  return _write_coco_vqa(root, "")


def write_textvqa(root):
  for split, ids in (("train", [1]), ("val", [2, 3])):
    _json(root / f"TextVQA_0.5.1_{split}.json", {"dataset_version": "0.5.1",
                                                 "data": [
        {"question_id": i, "image_id": f"img{i}", "question": f"brand {i}?",
         "answers": _answers(f"acme{i}")} for i in ids]})
    for i in ids:
      _image(root / f"train_images/img{i}.jpg")
  return [(f"answer en brand {i}?", _answers(f"acme{i}")) for i in (2, 3)]


def write_docvqa(root, annotations="spdocvqa_qas/{split}_v1.0_withQT.json",
                 image_dir="spdocvqa_images/"):
  """Writes DocVQA in the layout given ({split}: the official split name).

  The defaults are the current archives, spdocvqa_qas.zip and
  spdocvqa_images.tar.gz, unpacked. Image i is (24 + i) pixels wide, so a
  test can tell which one was read.
  """
  for split, ids in (("train", [1]), ("val", [2])):
    _json(root / annotations.format(split=split), {
        "dataset_name": "docvqa", "dataset_split": split,
        "dataset_version": "1.0", "data": [
            {"questionId": i, "question": f"date {i}?",
             "question_types": ["form"], "image": f"documents/doc{i}.png",
             "docId": i, "ucsf_document_id": f"doc{i}",
             "ucsf_document_page_no": "1", "answers": [f"1/{i}", f"0{i}"],
             "data_split": split}
            for i in ids]})
    for i in ids:
      _image(root / image_dir.format(split=split) / f"doc{i}.png",
             size=(24 + i, 16))
  return [("answer en date 2?", ["1/2", "02"])]


def write_infovqa(root, annotations=None, image_dir="infographicsvqa_images/"):
  """Writes InfographicVQA in the layout given ({official split: path}).

  The defaults are the official file names at the root. Image i is (24 + i)
  pixels wide, so a test can tell which one was read.
  """
  annotations = annotations or {
      "train": "infographicsVQA_train_v1.0.json",
      "val": "infographicsVQA_val_v1.0_withQT.json"}
  for split, ids in (("train", [1]), ("val", [2])):
    _json(root / annotations[split], {
        "dataset_name": "infographicVQA", "dataset_version": "1.0",
        "dataset_split": split, "data": [
            {"questionId": i, "question": f"percent {i}?",
             "image_local_name": f"{i}.jpeg",
             "image_url": f"https://example.com/{i}.jpeg",
             "ocr_output_file": f"{i}.json", "answers": [f"{i}0%"],
             "data_split": split}
            for i in ids]})
    for i in ids:
      _image(root / image_dir / f"{i}.jpeg", size=(24 + i, 16))
  return [("answer en percent 2?", ["20%"])]


def write_chartqa(root):
  for split in ("train", "val", "test"):
    for source in ("human", "augmented"):
      _json(root / f"{split}/{split}_{source}.json", [
          {"imgname": f"c{i}.png", "query": f"{source} value {i}?",
           "label": 5 * i} for i in range(2)])
    for i in range(2):
      _image(root / f"{split}/png/c{i}.png")
  return {source: [(f"answer en {source} value {i}?", [str(5 * i)])
                   for i in range(2)] for source in ("human", "augmented")}


def write_ai2d(root):
  (root / "ai2d_test_ids.csv").write_text("2\n")
  for i in (1, 2):
    _json(root / f"questions/{i}.png.json", {"imageName": f"{i}.png",
                                             "questions": {
        f"what eats {i}?": {"abcLabel": False, "answerTexts": ["fox", "owl"],
                            "correctAnswer": 1, "questionId": f"{i}.png-0"},
        "What is A in the diagram?": {
            "abcLabel": True, "answerTexts": ["leaf", "root"],
            "correctAnswer": 0, "questionId": f"{i}.png-1"}}})
    _json(root / f"annotations/{i}.png.json", {"imageName": f"{i}.png",
                                               "text": {"T1": {
        "rectangle": [[2, 2], [20, 12]], "replacementText": "A",
        "value": "leaf"}}})
    _image(root / f"images/{i}.png", color=(255, 255, 255))
  return [("answer en What is A in the diagram? choose from: leaf \t root",
           ["leaf"]),
          ("answer en what eats 2? choose from: fox \t owl", ["owl"])]


def write_ocrvqa(root):
  splits = {"100": 1, "200": 2, "300": 3}
  _json(root / "dataset.json", {
      image_id: {"imageURL": f"http://images.amazon.com/{image_id}.jpg",
                 "questions": [f"Who wrote {image_id}?", "Genre?"],
                 "answers": [f"author {image_id}", "Travel"],
                 "title": "t", "authorName": "a", "genre": "Travel",
                 "split": split}
      for image_id, split in splits.items()})
  for image_id in splits:
    _image(root / f"images/{image_id}.jpg")
  return [("answer en Who wrote 200?", ["author 200"]),
          ("answer en Genre?", ["Travel"])]


def write_tallyqa(root):
  for split, image in (("train", "train2014/COCO_train2014_000000000001.jpg"),
                       ("test", "VG_100K_2/5.jpg")):
    _json(root / f"{split}.json", [
        {"image": image, "answer": 3, "data_source": "amt", "image_id": 5,
         "question": "How many dogs?", "question_id": 77,
         **({"issimple": True} if split == "test" else {})}])
    _image(root / image)
  for directory in ("VG_100K", "val2014"):
    (root / directory).mkdir()
  return [("answer en How many dogs?", ["3"])]


def write_scienceqa(root):
  problems, pid_splits = {}, {"train": [], "val": [], "test": []}
  for n, split in enumerate(["train", "val", "val", "test"]):
    pid = str(n + 1)
    has_image = n != 2  # ScienceQA also has questions without an image.
    problems[pid] = {
        "question": f"Which is {pid}?", "choices": ["up", "down", "left"],
        "answer": n % 3, "hint": "Look." if n else "",
        "image": "image.png" if has_image else None, "split": split}
    pid_splits[split].append(pid)
    if has_image:
      _image(root / f"images/{split}/{pid}/image.png")
  _json(root / "problems.json", problems)
  _json(root / "pid_splits.json", pid_splits)
  (root / "images/test").mkdir(parents=True, exist_ok=True)
  return [("answer en Which is 2? context: Look. choose from: up \t down \t "
           "left", ["down"])]


WRITERS = {
    "omnismola_coco_captions": write_coco_captions,
    "omnismola_textcaps": write_textcaps,
    "omnismola_vqav2": write_vqav2,
    "omnismola_okvqa": write_okvqa,
    "omnismola_textvqa": write_textvqa,
    "omnismola_docvqa": write_docvqa,
    "omnismola_infovqa": write_infovqa,
    "omnismola_chartqa": write_chartqa,
    "omnismola_ai2d": write_ai2d,
    "omnismola_ocrvqa": write_ocrvqa,
    "omnismola_tallyqa": write_tallyqa,
    "omnismola_scienceqa": write_scienceqa,
}


def _config(tmp, **overrides):
  return schema.data_config(**dict(dict(
      mixture=mixtures.BENCHMARKS_MIX, feature_lengths=dict(prefix=64, suffix=16),
      tfds_data_dir=str(tmp / "tfds"), manual_dir=str(tmp / "manual"),
      shuffle_buffer=16, image_size=32), **overrides))


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
  """Every benchmark built by pipeline.prepare from tiny official layouts."""
  tmp = tmp_path_factory.mktemp("real")
  expected = {}
  for name, write in WRITERS.items():
    (tmp / "manual" / name).mkdir(parents=True)
    expected[name] = write(tmp / "manual" / name)
  config = _config(tmp)
  pipeline.prepare(config)
  return config, expected


def _expected(task, expected):
  benchmark = {b.task: b for b in suite.BENCHMARKS}[task]
  found = expected[benchmark.builder.name]
  return found[benchmark.config] if benchmark.config else found


@pytest.mark.parametrize("task", suite.TASKS)
def test_task_yields_prompts_targets_and_references(real_data, task):
  _, expected = real_data
  rows = list(tasks.get_task(task).get_dataset(
      sequence_length=None, split="validation", shuffle=False, seed=0
  ).as_numpy_iterator())
  got = sorted((x["prefix_pretokenized"].decode(),
                [r.decode() for r in x["references"]]) for x in rows)
  assert got == sorted(_expected(task, expected))
  for x in rows:
    assert x["suffix_pretokenized"] in x["references"].tolist()
    assert x["suffix"].tolist() == tasks.VOCAB.encode(
        x["suffix_pretokenized"].decode()) + [tasks.EOS_ID]
    assert x["image"].dtype == np.float32 and x["image"].shape[-1] == 3
  assert tasks.metric_of(task) == {b.task: b.metric
                                   for b in suite.BENCHMARKS}[task]


def test_ai2d_letter_questions_get_letters_drawn(real_data):
  config, _ = real_data
  ds = tfds.builder("omnismola_ai2d", data_dir=config.tfds_data_dir).as_dataset(
      split="test")
  by_question = {x["question"].decode(): x["image"]
                 for x in ds.as_numpy_iterator()}
  # The original is plain white; the letter question's copy has "A" on it.
  assert np.all(by_question["what eats 2?"] > 240)
  assert by_question["What is A in the diagram?"].min() < 128


def test_benchmarks_mix_trains_and_evaluates(real_data):
  config, _ = real_data
  names = pipeline.mixture_task_names(config)
  assert names == sorted(suite.TASKS)
  train_sizes = {name: tasks.get_task(name).num_input_examples("train")
                 for name in names}
  rates = dict(mixtures.mixture_tasks(config.mixture))
  for name, size in train_sizes.items():
    assert rates[name] == pytest.approx(min(size, 100_000)**0.5)
  batch = next(pipeline.make_train_iterator(config, global_batch_size=8,
                                            seed=0))
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["text"].shape == (8, 80)
  assert np.abs(batch["image"]).max() <= 1.0
  # Images of every size and aspect, resized, pack into rows too.
  packed = next(pipeline.make_train_iterator(
      ml_collections.ConfigDict({**config.to_dict(), "packing": dict(
          examples=3, text_length=0, window=12)}), global_batch_size=4,
      seed=0))
  assert packed["image"].shape == (4, 3, 32, 32, 3)
  assert packed["segment_ids"].shape == (4, 80)
  filled = packed["segment_ids"].max(axis=1)  # Slots are filled in order.
  assert filled.min() >= 1 and filled.sum() > 4
  for row, count in enumerate(filled):
    assert np.abs(packed["image"][row, :count]).max(axis=(1, 2, 3)).min() > 0
    assert not packed["image"][row, count:].any()
  (docvqa,) = pipeline.make_eval_sets(config, batch_size=4, tasks=["docvqa"])
  (b,) = list(docvqa.batches())
  assert docvqa.metric == "anls" and b["references"][0] == ["1/2", "02"]
  assert b["image"].shape == (4, 32, 32, 3)


def test_explicit_rates_mixture(real_data):
  config, _ = real_data
  mixtures.register_mixture("two_vqa", [("vqav2", 3.0), ("okvqa", 1.0)])
  assert mixtures.mixture_tasks("two_vqa") == [("okvqa", 1.0),
                                               ("vqav2", 3.0)]
  two_vqa = ml_collections.ConfigDict({**config.to_dict(),
                                       "mixture": "two_vqa"})
  tags = next(pipeline.make_train_iterator(two_vqa, global_batch_size=64,
                                           seed=0))["task_id"]
  assert 0.6 < tags.mean() < 0.9  # vqav2 (task 1) 3 times as often.


def test_missing_files_are_each_named(tmp_path):
  write_vqav2(tmp_path / "vqa")
  (tmp_path / "vqa/v2_mscoco_val2014_annotations.json").unlink()
  for path in (tmp_path / "vqa/train2014").iterdir():
    path.unlink()
  (tmp_path / "vqa/train2014").rmdir()
  builder = tfds.builder("omnismola_vqav2", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError) as e:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(tmp_path / "vqa")))
  message = str(e.value)
  assert "missing in" in message and "Expected layout" in message
  assert re.search(r"missing in .*: train2014/, "
                   r"v2_mscoco_val2014_annotations.json\.", message)
  assert "<manual_dir>/v2_OpenEnded_mscoco_val2014_questions.json" in message
  # No manual_dir at all: the whole layout is in the message.
  with pytest.raises(FileNotFoundError, match="no manual files.*"
                     r"\n  <manual_dir>/TextCaps_0.1_train.json"):
    tfds.builder("omnismola_textcaps",
                 data_dir=str(tmp_path / "tfds")).download_and_prepare(
                     download_config=tfds.download.DownloadConfig(
                         manual_dir=str(tmp_path / "nothing")))


def test_undecodable_image_names_the_example(tmp_path):
  write_docvqa(tmp_path / "doc")
  (tmp_path / "doc/spdocvqa_images/doc2.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"Example omnismola_docvqa/validation/"
                     r"2: cannot decode image .*/spdocvqa_images/doc2.png"):
    _build("omnismola_docvqa", tmp_path / "doc", tmp_path / "tfds")


def _build(name, manual_dir, data_dir):
  """Builds `name` from manual_dir and reads every split back.

  Returns:
    {split: sorted (id, question, answers, image shape) of its examples}.
  """
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return {split: sorted((x["id"].decode(), x["question"].decode(),
                         [a.decode() for a in x["answers"]], x["image"].shape)
                        for x in builder.as_dataset(split=split)
                        .as_numpy_iterator())
          for split in builder.info.splits}


# (annotations, image folder) as the known copies of DocVQA lay them out.
DOCVQA_LAYOUTS = {
    "current archives": ("spdocvqa_qas/{split}_v1.0_withQT.json",
                         "spdocvqa_images/"),
    "images archive unpacked nested": ("spdocvqa_qas/{split}_v1.0_withQT.json",
                                       "spdocvqa_images/images/"),
    "images archive unpacked into images/": (
        "spdocvqa_qas/{split}_v1.0_withQT.json", "images/"),
    "images archive unpacked into documents/": (
        "spdocvqa_qas/{split}_v1.0_withQT.json", "documents/"),
    "big_vision": ("{split}_v1.0_withQT.json", "{split}/documents/"),
    "per-split tarballs": ("{split}/{split}_v1.0.json", "{split}/documents/"),
}


@pytest.mark.parametrize("layout", DOCVQA_LAYOUTS)
def test_docvqa_builds_from_each_known_layout(tmp_path, layout):
  write_docvqa(tmp_path / "doc", *DOCVQA_LAYOUTS[layout])
  assert _build("omnismola_docvqa", tmp_path / "doc", tmp_path / "tfds") == {
      "train": [("1", "date 1?", ["1/1", "01"], (16, 25, 3))],
      "validation": [("2", "date 2?", ["1/2", "02"], (16, 26, 3))]}


# ({split: annotations}, image folder) as the known copies of InfographicVQA
# lay them out.
INFOVQA_LAYOUTS = {
    "official names at the root": (
        {"train": "infographicsVQA_train_v1.0.json",
         "val": "infographicsVQA_val_v1.0_withQT.json"},
        "infographicsvqa_images/"),
    "qas archive unpacked, images renamed (big_vision)": (
        {"train": "infographicsvqa_qas/infographicsVQA_train_v1.0.json",
         "val": "infographicsvqa_qas/infographicsVQA_val_v1.0_withQT.json"},
        "images/"),
    "infographicVQA spelling": (
        {"train": "infographicVQA_train_v1.0.json",
         "val": "infographicVQA_val_v1.0.json"},
        "infographicsvqa_images/"),
    "validation without _withQT": (
        {"train": "infographicsvqa_qas/infographicVQA_train_v1.0.json",
         "val": "infographicsvqa_qas/infographicsVQA_val_v1.0.json"},
        "infographicsvqa_images/"),
}


@pytest.mark.parametrize("layout", INFOVQA_LAYOUTS)
def test_infovqa_builds_from_each_known_layout(tmp_path, layout):
  write_infovqa(tmp_path / "info", *INFOVQA_LAYOUTS[layout])
  assert _build("omnismola_infovqa", tmp_path / "info", tmp_path / "tfds") == {
      "train": [("1", "percent 1?", ["10%"], (16, 25, 3))],
      "validation": [("2", "percent 2?", ["20%"], (16, 26, 3))]}


def test_missing_files_error_lists_the_accepted_alternatives(tmp_path):
  write_docvqa(tmp_path / "doc")
  for path in (tmp_path / "doc/spdocvqa_images").iterdir():
    path.unlink()
  (tmp_path / "doc/spdocvqa_images").rmdir()
  with pytest.raises(FileNotFoundError) as e:
    _build("omnismola_docvqa", tmp_path / "doc", tmp_path / "tfds")
  message = str(e.value)
  # Each split's image folder, named with every folder that would do.
  assert re.search(
      r"missing in .*: spdocvqa_images/images/ \(or spdocvqa_images/, "
      r"images/, documents/, train/documents/\), spdocvqa_images/images/ "
      r"\(or spdocvqa_images/, images/, documents/, val/documents/\)\. "
      "Expected layout", message)
  assert ("\n  <manual_dir>/spdocvqa_qas/train_v1.0_withQT.json"
          "\n    (or <manual_dir>/train_v1.0_withQT.json)"
          "\n    (or <manual_dir>/train/train_v1.0.json)\n") in message


def test_missing_image_names_the_example_and_the_folder_searched(tmp_path):
  write_docvqa(tmp_path / "doc", *DOCVQA_LAYOUTS[
      "images archive unpacked nested"])
  (tmp_path / "doc/spdocvqa_images/images/doc2.png").unlink()
  with pytest.raises(FileNotFoundError, match=r"Example omnismola_docvqa/"
                     r"validation/2: image .*/spdocvqa_images/images/doc2.png "
                     "does not exist"):
    _build("omnismola_docvqa", tmp_path / "doc", tmp_path / "tfds")


def test_load_image_orients_converts_and_caps_size(tmp_path):
  big = tmp_path / "big.png"
  Image.new("L", (2000, 500), 7).save(big)
  image = images.load_image(big, example="x")
  assert image.shape == (224, images.MAX_SIDE, 3) and image.dtype == np.uint8
  with pytest.raises(FileNotFoundError, match="Example y: image .*nope.jpg"):
    images.load_image(tmp_path / "nope.jpg", example="y")


def _docs_walkthrough_module() -> str:
  """The user module of docs/data.md's walk-through, verbatim."""
  docs = open("docs/data.md").read()
  (code,) = re.findall(r"```python\n(# my_tasks\.py\n.*?)```", docs, re.S)
  return code


def test_docs_walkthrough_user_module_trains(tmp_path, monkeypatch):
  monkeypatch.setitem(synthetic_builder.SPLIT_SIZES, "train", 8)
  monkeypatch.setitem(synthetic_builder.SPLIT_SIZES, "validation", 4)
  (tmp_path / "my_tasks.py").write_text(_docs_walkthrough_module())
  monkeypatch.syspath_prepend(str(tmp_path))
  manual = tmp_path / "manual/my_vqa"
  for split, n in (("train", 6), ("validation", 2)):
    lines = [json.dumps({"id": f"{split}{i}", "image": f"{split}{i}.png",
                         "question": f"what number is {i}?",
                         "answer": str(i)}) for i in range(n)]
    _image(manual / "images" / f"{split}0.png")  # Creates the directories.
    (manual / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(n):
      _image(manual / "images" / f"{split}{i}.png", color=(i, i, i))
  config = _config(tmp_path, mixture="my_mix", task_modules=("my_tasks",))
  pipeline.prepare(config)
  batch = next(pipeline.make_train_iterator(config, global_batch_size=4,
                                            seed=0))
  assert batch["image"].shape == (4, 32, 32, 3)
  (my_vqa,) = pipeline.make_eval_sets(config, batch_size=2, tasks=["my_vqa"])
  assert my_vqa.metric == "exact_match"
  (b,) = list(my_vqa.batches())
  rows = sorted(zip([pipeline.detokenize(row) for row in b["text"]],
                    b["references"]))
  assert rows == [("answer en what number is 0?", ["0"]),
                  ("answer en what number is 1?", ["1"])]


def test_importing_needs_no_manual_files(tmp_path):
  # A fresh process with no data anywhere registers every task and mixture.
  code = ("from omnismola.data import mixtures, pipeline; "
          "from omnismola import schema; "
          "print(len(pipeline.mixture_task_names(schema.data_config("
          "mixture='benchmarks_mix'))))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True, cwd=os.getcwd(),
                          env={**os.environ, "HOME": str(tmp_path),
                               "TFDS_DATA_DIR": str(tmp_path / "none")})
  assert result.stdout.split()[-1] == str(len(suite.TASKS))
