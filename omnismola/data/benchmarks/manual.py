"""The base of every real-dataset builder: official files in, one schema out.

Real benchmarks cannot be downloaded by a script (accounts, licences, or
just size), so each builder reads the official files from a local
manual_dir, laid out as the dataset ships them. A subclass names the files
it needs (MANUAL_FILES) and turns them into `Record`s (`_records`); the
schema (FEATURES, which prompts.py turns into raw examples), the check that
lists every missing file with the layout expected, and image decoding
(images.load_image) are shared here.
"""
import dataclasses
import json
from typing import Any, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath

from omnismola.data.benchmarks import images

FEATURES = tfds.features.FeaturesDict({
    # Longer side <= images.MAX_SIDE; JPEG keeps the built data small.
    "image": tfds.features.Image(shape=(None, None, 3),
                                 encoding_format="jpeg"),
    "id": tfds.features.Text(),        # The official question/image id.
    "question": tfds.features.Text(),  # Empty for captioning.
    "context": tfds.features.Text(),   # Text beside the image (ScienceQA).
    "choices": tfds.features.Sequence(tfds.features.Text()),  # Multiple choice.
    "answers": tfds.features.Sequence(tfds.features.Text()),  # References.
})


@dataclasses.dataclass(frozen=True)
class Record:
  """One example as a dataset's annotations describe it, image not read yet."""
  id: str
  image: epath.Path
  answers: Sequence[str]
  question: str = ""
  context: str = ""
  choices: Sequence[str] = ()
  labels: Sequence[images.Label] = ()  # Text to draw on the image (AI2D).


def read_json(path: epath.Path) -> Any:
  with path.open() as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True, init=False)
class OneOf:
  """A file or directory that copies of a dataset keep in different places
  (archives get re-released, loaders rename folders). The first of `paths`
  that exists is read: list an inner path before the one holding it ("a/b/"
  before "a/"), since "a/" exists whichever layout holds.
  """
  paths: tuple[str, ...]

  def __init__(self, *paths: str):
    object.__setattr__(self, "paths", paths)


# One entry of MANUAL_FILES: a path relative to manual_dir (a directory ends
# in /), or a choice.
Entry = str | OneOf


def _choices(entry: Entry) -> tuple[str, ...]:
  return entry.paths if isinstance(entry, OneOf) else (entry,)


def _entries(files: Mapping[str, Sequence[Entry]]) -> list[Entry]:
  """Every entry of {split: entries}, once, sorted by its paths."""
  return sorted({entry for split_files in files.values()
                 for entry in split_files}, key=_choices)


def _name(entry: Entry) -> str:
  """How a missing-file error names the entry: "a", or "a (or b, c)"."""
  first, *others = _choices(entry)
  return f"{first} (or {', '.join(others)})" if others else first


def layout(files: Mapping[str, Sequence[Entry]]) -> str:
  """The manual_dir layout a builder expects, one path per line (a OneOf's
  other accepted paths follow its first, indented)."""
  lines = []
  for entry in _entries(files):
    first, *others = _choices(entry)
    lines.append(f"  <manual_dir>/{first}")
    lines.extend(f"    (or <manual_dir>/{path})" for path in others)
  return "\n".join(lines)


def _existing(root: epath.Path, entry: Entry) -> str | None:
  """The first of the entry's paths that is under root (a trailing / marks a
  directory), None if none is."""
  return next((path for path in _choices(entry)
               if _exists(root / path, path)), None)


def resolve(root: epath.Path, entry: Entry) -> epath.Path:
  """The path of `entry` under root that exists (the one `_records` reads)."""
  path = _existing(root, entry)
  if path is None:
    raise FileNotFoundError(f"Not in {root}: {_name(entry)}.")
  return root / path


def _exists(path: epath.Path, name: str) -> bool:
  return path.is_dir() if name.endswith("/") else path.is_file()


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of FEATURES examples from the official files in manual_dir.

  Subclasses set HOMEPAGE, MANUAL_FILES ({TFDS split: entries}), VERSION
  when it is not 1.0.0, and implement `_records(root, split)`, which finds a
  OneOf's path with `resolve`.
  """

  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = ""
  MANUAL_FILES: Mapping[str, Sequence[Entry]] = {}

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Copy the official files of {cls.HOMEPAGE} into manual_dir, "
        f"unchanged:\n{layout(cls.MANUAL_FILES)}")

  def _info(self) -> tfds.core.DatasetInfo:
    # Not dataset_info_from_configs: that reads metadata files next to the
    # builder's module, which a user's single-file module does not have.
    return tfds.core.DatasetInfo(builder=self, features=FEATURES,
                                 homepage=self.HOMEPAGE)

  def _manual_root(self, dl_manager) -> epath.Path:
    """The checked manual_dir: every file of MANUAL_FILES is there."""
    try:
      root = dl_manager.manual_dir
    except AssertionError as e:  # TFDS: the directory is missing or empty.
      raise FileNotFoundError(
          f"{self.name}: no manual files. Expected layout:\n"
          f"{layout(self.MANUAL_FILES)}") from e
    missing = [_name(entry) for entry in _entries(self.MANUAL_FILES)
               if _existing(root, entry) is None]
    if missing:
      raise FileNotFoundError(
          f"{self.name}: missing in {root}: "
          f"{', '.join(missing)}. Expected layout:\n"
          f"{layout(self.MANUAL_FILES)}")
    return root

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    return {split: self._generate_examples(root, split)
            for split in self.MANUAL_FILES}

  def _generate_examples(self, root: epath.Path, split: str):
    for record in self._records(root, split):
      yield record.id, {
          "image": images.load_image(
              record.image, example=f"{self.name}/{split}/{record.id}",
              labels=record.labels),
          "id": record.id,
          "question": record.question,
          "context": record.context,
          "choices": list(record.choices),
          "answers": list(record.answers),
      }

  def _records(self, root: epath.Path, split: str) -> Iterator[Record]:
    raise NotImplementedError
