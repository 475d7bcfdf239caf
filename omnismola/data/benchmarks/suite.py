"""SeqIO tasks of the real benchmarks (BENCHMARKS; docs/data.md tabulates
their prompts, metrics and files).

Registering is cheap: a task names its TFDS data but reads nothing until
used, so importing omnismola.data works without any dataset present;
`pipeline.prepare` builds the data of a mixture's tasks from their manual
dirs (`<config.data.manual_dir>/<builder name>`). AI2D and TallyQA ship no
validation split; their test split is what the pipeline evaluates as
"validation" (as the papers report).
"""
import dataclasses

import seqio

from omnismola.data import tasks
from omnismola.data.benchmarks import builders
from omnismola.data.benchmarks import manual
from omnismola.data.benchmarks import prompts


@dataclasses.dataclass(frozen=True)
class Benchmark:
  task: str
  builder: type[manual.ManualBuilder]
  prompt: prompts.Prompt
  metric: str
  config: str = ""  # The builder config, for builders that have them.


BENCHMARKS = (
    Benchmark("coco_captions", builders.CocoCaptions, prompts.caption,
              "cider"),
    Benchmark("textcaps", builders.TextCaps, prompts.caption, "cider"),
    Benchmark("vqav2", builders.Vqav2, prompts.question, "vqa_accuracy"),
    Benchmark("okvqa", builders.OkVqa, prompts.question, "vqa_accuracy"),
    Benchmark("textvqa", builders.TextVqa, prompts.question, "vqa_accuracy"),
    Benchmark("docvqa", builders.DocVqa, prompts.question, "anls"),
    Benchmark("infovqa", builders.InfoVqa, prompts.question, "anls"),
    Benchmark("chartqa_human", builders.ChartQa, prompts.question,
              "relaxed_accuracy", config="human"),
    Benchmark("chartqa_augmented", builders.ChartQa, prompts.question,
              "relaxed_accuracy", config="augmented"),
    Benchmark("ai2d", builders.Ai2d, prompts.choice, "exact_match"),
    Benchmark("scienceqa", builders.ScienceQa, prompts.choice, "exact_match"),
    Benchmark("tallyqa", builders.TallyQa, prompts.question, "exact_match"),
    Benchmark("ocrvqa", builders.OcrVqa, prompts.question, "exact_match"),
)

TASKS = tuple(b.task for b in BENCHMARKS)


def register_manual_task(name: str, builder: type[manual.ManualBuilder],
                         prompt: prompts.Prompt, metric: str, *,
                         config: str = "") -> seqio.Task:
  """Registers a task over a ManualBuilder's data with a prompt and metric;
  its "validation" split is the builder's test split if it has no other."""
  splits = {split: split for split in builder.MANUAL_FILES}
  splits.setdefault("validation", "test")
  # The versioned TFDS name SeqIO wants: name[/config]:version.
  dataset = f"{builder.name}/{config}" if config else builder.name
  return tasks.register_vl_task(
      name,
      # read_only: reading never builds; pipeline.prepare does, explicitly.
      seqio.TfdsDataSource(tfds_name=f"{dataset}:{builder.VERSION}",
                           splits=splits, read_only=True),
      metric=metric, preprocessors=[prompts.raw_example(prompt)])


for _b in BENCHMARKS:
  register_manual_task(_b.task, _b.builder, _b.prompt, _b.metric,
                       config=_b.config)
