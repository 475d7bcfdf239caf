"""TFDS builders of the real benchmarks, from their official files.

Each builder reads a local manual_dir laid out as the dataset ships (see its
MANUAL_FILES, and docs/data.md) and stores manual.FEATURES. Nothing is
downloaded. Datasets that share an annotation format share a reader:

  COCO-VQA json (questions + annotations files)   VQAv2, OK-VQA
  {"data": [...]} question lists                   TextVQA, DocVQA, InfoVQA
  captions grouped by image                        COCO Captions, TextCaps

TFDS split names are train / validation / test (the official "val" is
"validation").
"""
import collections
import csv
import os
from typing import Callable, Iterable, Iterator

import tensorflow_datasets as tfds
from etils import epath

from omnismola.data.benchmarks import manual
from omnismola.data.benchmarks.manual import Record

# TFDS split -> the official split name, for datasets that name files by it.
_OFFICIAL = {"train": "train", "validation": "val", "test": "test"}


# ------------------------------------------------------------------- readers
def group_captions(
    captions: Iterable[tuple[str, epath.Path, str]]) -> Iterator[Record]:
  """(image id, image path, caption) triples -> one Record per image, with
  every caption as a reference (as captioning benchmarks score)."""
  by_image = collections.defaultdict(list)
  paths = {}
  for image_id, path, caption in captions:
    by_image[image_id].append(caption)
    paths[image_id] = path
  for image_id, texts in by_image.items():
    yield Record(id=image_id, image=paths[image_id], answers=texts)


def coco_vqa_records(root: epath.Path, questions_file: str,
                     annotations_file: str,
                     image_dir: str) -> Iterator[Record]:
  """VQA-format questions + annotations over COCO images (VQAv2, OK-VQA);
  images are <image_dir>/COCO_<subset>_<image_id:012d>.jpg."""
  subset = image_dir.rstrip("/")
  annotations = {a["question_id"]: a for a in manual.read_json(
      root / annotations_file)["annotations"]}
  for q in manual.read_json(root / questions_file)["questions"]:
    answers = annotations[q["question_id"]]["answers"]
    yield Record(
        id=str(q["question_id"]),
        image=root / subset / f"COCO_{subset}_{q['image_id']:012d}.jpg",
        question=q["question"], answers=[a["answer"] for a in answers])


def data_list_records(
    path: epath.Path, id_key: str,
    image_path: Callable[[dict], epath.Path]) -> Iterator[Record]:
  """{"data": [{question, answers, <id_key>, ...}]}: Text/Doc/InfoVQA."""
  for x in manual.read_json(path)["data"]:
    yield Record(id=str(x[id_key]), image=image_path(x),
                 question=x["question"], answers=x["answers"])


# ------------------------------------------------------------------ captions
class CocoCaptions(manual.ManualBuilder):
  """COCO Captions 2017: five captions per image."""
  name = "omnismola_coco_captions"
  HOMEPAGE = "https://cocodataset.org/#download"
  MANUAL_FILES = {
      "train": ("annotations/captions_train2017.json", "train2017/"),
      "validation": ("annotations/captions_val2017.json", "val2017/"),
  }

  def _records(self, root, split):
    annotations, image_dir = self.MANUAL_FILES[split]
    data = manual.read_json(root / annotations)
    files = {image["id"]: image["file_name"] for image in data["images"]}
    return group_captions(
        (str(a["image_id"]), root / image_dir / files[a["image_id"]],
         a["caption"].strip()) for a in data["annotations"])


class TextCaps(manual.ManualBuilder):
  """TextCaps 0.1: captions that read the text in the image."""
  name = "omnismola_textcaps"
  HOMEPAGE = "https://textvqa.org/textcaps/dataset/"
  # Validation images are in train_images/, as TextVQA ships them.
  MANUAL_FILES = {
      "train": ("TextCaps_0.1_train.json", "train_images/"),
      "validation": ("TextCaps_0.1_val.json", "train_images/"),
  }

  def _records(self, root, split):
    annotations, image_dir = self.MANUAL_FILES[split]
    return group_captions(
        (x["image_id"], root / image_dir / f"{x['image_name']}.jpg",
         x["caption_str"])
        for x in manual.read_json(root / annotations)["data"])


# ---------------------------------------------------------- COCO-VQA format
class Vqav2(manual.ManualBuilder):
  """VQAv2 (balanced real images), ten answers per question."""
  name = "omnismola_vqav2"
  HOMEPAGE = "https://visualqa.org/download.html"
  # (questions, annotations, image directory) per split.
  MANUAL_FILES = {
      "train": ("v2_OpenEnded_mscoco_train2014_questions.json",
                "v2_mscoco_train2014_annotations.json", "train2014/"),
      "validation": ("v2_OpenEnded_mscoco_val2014_questions.json",
                     "v2_mscoco_val2014_annotations.json", "val2014/"),
  }

  def _records(self, root, split):
    return coco_vqa_records(root, *self.MANUAL_FILES[split])


class OkVqa(Vqav2):
  """OK-VQA: questions needing outside knowledge, in VQAv2's format."""
  name = "omnismola_okvqa"
  HOMEPAGE = "https://okvqa.allenai.org/download.html"
  MANUAL_FILES = {
      "train": ("OpenEnded_mscoco_train2014_questions.json",
                "mscoco_train2014_annotations.json", "train2014/"),
      "validation": ("OpenEnded_mscoco_val2014_questions.json",
                     "mscoco_val2014_annotations.json", "val2014/"),
  }


# ------------------------------------------------------ {"data": [...]} lists
class TextVqa(manual.ManualBuilder):
  """TextVQA 0.5.1: questions about text in natural images."""
  name = "omnismola_textvqa"
  HOMEPAGE = "https://textvqa.org/dataset/"
  MANUAL_FILES = {
      "train": ("TextVQA_0.5.1_train.json", "train_images/"),
      "validation": ("TextVQA_0.5.1_val.json", "train_images/"),
  }

  def _records(self, root, split):
    annotations, image_dir = self.MANUAL_FILES[split]
    return data_list_records(
        root / annotations, "question_id",
        lambda x: root / image_dir / f"{x['image_id']}.jpg")


def _docvqa_files(official: str) -> tuple[manual.OneOf, manual.OneOf]:
  """DocVQA's (annotations, image folder) of a split, in any layout known
  from the archives and public loaders (docs/data.md says which)."""
  return (
      manual.OneOf(f"spdocvqa_qas/{official}_v1.0_withQT.json",
                   f"{official}_v1.0_withQT.json",
                   f"{official}/{official}_v1.0.json"),
      # The nested folder first: spdocvqa_images/ exists in its layout too.
      manual.OneOf("spdocvqa_images/images/", "spdocvqa_images/", "images/",
                   "documents/", f"{official}/documents/"))


class DocVqa(manual.ManualBuilder):
  """DocVQA (single page, "spdocvqa"): questions about scanned documents."""
  name = "omnismola_docvqa"
  HOMEPAGE = "https://rrc.cvc.uab.es/?ch=17&com=downloads"
  MANUAL_FILES = {split: _docvqa_files(_OFFICIAL[split])
                  for split in ("train", "validation")}

  def _records(self, root, split):
    annotations, image_dir = (manual.resolve(root, entry)
                              for entry in self.MANUAL_FILES[split])
    # "image" is "documents/<name>.png", but which folder holds <name>.png
    # depends on how the images archive was unpacked: only the name is sure.
    return data_list_records(
        annotations, "questionId",
        lambda x: image_dir / os.path.basename(x["image"]))


def _infovqa_annotations(*names: str) -> manual.OneOf:
  """An InfographicVQA annotation file under any of `names`, at the root or
  in infographicsvqa_qas/ (as infographicsvqa_qas.zip unpacks)."""
  return manual.OneOf(*(folder + name for name in names
                        for folder in ("", "infographicsvqa_qas/")))


class InfoVqa(manual.ManualBuilder):
  """InfographicVQA: questions about infographics."""
  name = "omnismola_infovqa"
  HOMEPAGE = "https://rrc.cvc.uab.es/?ch=17&com=downloads"
  # images/ is big_vision's name for the images archive's folder.
  _IMAGES = manual.OneOf("infographicsvqa_images/", "images/")
  # The official train file's name has no "_withQT"; the validation one's
  # has. "infographicVQA_" is a spelling some copies use.
  MANUAL_FILES = {
      "train": (_infovqa_annotations("infographicsVQA_train_v1.0.json",
                                     "infographicVQA_train_v1.0.json"),
                _IMAGES),
      "validation": (_infovqa_annotations(
          "infographicsVQA_val_v1.0_withQT.json",
          "infographicsVQA_val_v1.0.json", "infographicVQA_val_v1.0.json"),
                     _IMAGES),
  }

  def _records(self, root, split):
    annotations, image_dir = (manual.resolve(root, entry)
                              for entry in self.MANUAL_FILES[split])
    return data_list_records(
        annotations, "questionId",
        lambda x: image_dir / x["image_local_name"])


# ---------------------------------------------------------- one-of-a-kind
class ChartQa(manual.ManualBuilder):
  """ChartQA: questions about charts; one config per question set, `human`
  (written) or `augmented` (generated)."""
  name = "omnismola_chartqa"
  HOMEPAGE = "https://github.com/vis-nlp/ChartQA"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="human"),
                     tfds.core.BuilderConfig(name="augmented")]
  MANUAL_FILES = {
      split: (f"{official}/{official}_human.json",
              f"{official}/{official}_augmented.json", f"{official}/png/")
      for split, official in _OFFICIAL.items()
  }

  def _records(self, root, split):
    human, augmented, image_dir = self.MANUAL_FILES[split]
    annotations = human if self.builder_config.name == "human" else augmented
    for index, x in enumerate(manual.read_json(root / annotations)):
      yield Record(id=f"{index}", image=root / image_dir / x["imgname"],
                   question=x["query"], answers=[str(x["label"])])


class Ai2d(manual.ManualBuilder):
  """AI2D: multiple-choice questions about science diagrams.

  The test split is the images in ai2d_test_ids.csv (as in PaliGemma and
  LLaVA); the rest is train. Questions about lettered labels ("abcLabel")
  get the letters of annotations/<image>.json drawn over the words.
  """
  name = "omnismola_ai2d"
  HOMEPAGE = "https://allenai.org/data/diagrams"
  _FILES = ("ai2d_test_ids.csv", "questions/", "images/", "annotations/")
  MANUAL_FILES = {"train": _FILES, "test": _FILES}

  def _records(self, root, split):
    with (root / "ai2d_test_ids.csv").open() as f:
      test_ids = {row[0].strip() for row in csv.reader(f) if row}
    for path in sorted((root / "questions").glob("*.json")):
      data = manual.read_json(path)
      image_id = data["imageName"].split(".")[0]
      if (image_id in test_ids) != (split == "test"):
        continue
      for question, q in data["questions"].items():
        yield Record(
            id=q["questionId"], image=root / "images" / data["imageName"],
            question=question, choices=q["answerTexts"],
            answers=[q["answerTexts"][q["correctAnswer"]]],
            labels=_ai2d_letters(root, data["imageName"])
            if q["abcLabel"] else ())


def _ai2d_letters(root: epath.Path, image_name: str):
  """The letter replacing each text label of an AI2D diagram, with its box."""
  text = manual.read_json(root / "annotations" / f"{image_name}.json")["text"]
  return tuple((tuple(map(tuple, t["rectangle"])), t["replacementText"])
               for t in text.values())


class OcrVqa(manual.ManualBuilder):
  """OCR-VQA: questions about book covers (title, author, genre, ...).

  dataset.json maps an image id to its questions, answers and split (1
  train, 2 validation, 3 test); the official downloader saves the cover as
  images/<id><extension of imageURL>.
  """
  name = "omnismola_ocrvqa"
  HOMEPAGE = "https://ocr-vqa.github.io/"
  MANUAL_FILES = {split: ("dataset.json", "images/")
                  for split in ("train", "validation", "test")}
  _SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}

  def _records(self, root, split):
    for image_id, x in manual.read_json(root / "dataset.json").items():
      if x["split"] != self._SPLIT_CODES[split]:
        continue
      extension = os.path.splitext(x["imageURL"])[1]
      for i, (question, answer) in enumerate(zip(x["questions"],
                                                 x["answers"])):
        yield Record(id=f"{image_id}/{i}",
                     image=root / "images" / f"{image_id}{extension}",
                     question=question, answers=[answer])


class TallyQa(manual.ManualBuilder):
  """TallyQA: counting questions over Visual Genome and COCO images.

  Each question's "image" is a path from the root, e.g. VG_100K_2/1.jpg or
  train2014/COCO_train2014_....jpg. There is no validation split.
  """
  name = "omnismola_tallyqa"
  HOMEPAGE = "https://github.com/manoja328/TallyQA_dataset"
  _IMAGES = ("VG_100K/", "VG_100K_2/", "train2014/", "val2014/")
  MANUAL_FILES = {"train": ("train.json", *_IMAGES),
                  "test": ("test.json", *_IMAGES)}

  def _records(self, root, split):
    for x in manual.read_json(root / self.MANUAL_FILES[split][0]):
      yield Record(id=str(x["question_id"]), image=root / x["image"],
                   question=x["question"], answers=[str(x["answer"])])


class ScienceQa(manual.ManualBuilder):
  """ScienceQA, the questions that have an image.

  pid_splits.json lists each split's problem ids; a problem with an image
  has it at images/<split>/<pid>/<problem's "image">.
  """
  name = "omnismola_scienceqa"
  HOMEPAGE = "https://scienceqa.github.io/"
  MANUAL_FILES = {
      split: ("problems.json", "pid_splits.json", f"images/{official}/")
      for split, official in _OFFICIAL.items()
  }

  def _records(self, root, split):
    problems, pid_splits, image_dir = self.MANUAL_FILES[split]
    problems = manual.read_json(root / problems)
    for pid in manual.read_json(root / pid_splits)[_OFFICIAL[split]]:
      x = problems[pid]
      if x["image"]:
        yield Record(id=pid, image=root / image_dir / pid / x["image"],
                     question=x["question"], context=x["hint"],
                     choices=x["choices"],
                     answers=[x["choices"][x["answer"]]])
