"""TFDS builder `omnismola_synthetic`: one config per synthetic task.

Nothing is downloaded: every example is rendered by `scenes.make_example`,
so any machine builds byte-identical data. SPLIT_SIZES says how many
examples each split gets; tests shrink it to build small copies in seconds
(readers take the sizes from the built files).
"""
import tensorflow_datasets as tfds

from omnismola.data.synthetic import render
from omnismola.data.synthetic import scenes

SPLIT_SIZES = {"train": 20_000, "validation": 256}


class OmnismolaSynthetic(tfds.core.GeneratorBasedBuilder):
  """Rendered shapes, words, bar charts and forms with prompts and answers."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Six tasks mirroring the papers' benchmarks."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=task, description=f"Synthetic {task}.")
      for task in scenes.TASKS
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = render.IMAGE_SIZE
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "prefix": tfds.features.Text(),
            "suffix": tfds.features.Text(),
            "references": tfds.features.Sequence(tfds.features.Text()),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is rendered here.
    return {split: self._generate_examples(split, size)
            for split, size in SPLIT_SIZES.items()}

  def _generate_examples(self, split: str, size: int):
    task = self.builder_config.name
    for index in range(size):
      yield index, scenes.make_example(task, split, index)


def tfds_name(task: str) -> str:
  """The versioned TFDS name of a task's config, as SeqIO wants it."""
  return f"{OmnismolaSynthetic.name}/{task}:{OmnismolaSynthetic.VERSION}"
