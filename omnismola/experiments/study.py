"""A study: arms of runs trained and evaluated, then tables and plots.

A `Run` is one trained model, which may start from an earlier run
(`starts_from`) or take parts of others (`parts_from`); an arm (table row)
may take several runs per seed (specialists: one per task) and several
seeds (mean ± sd).
Each run trains in <workdir>/<run name>/ and writes its result.json there;
results.json, results.md (one table per `Table`) and a PNG per table go in
<workdir> (a local path or a storage URL). A run whose result.json was
written for the same config (`same_run`) is not trained again, so a rerun
goes on where a study stopped (docs/results.md).
"""
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from omnismola import config_lib
from omnismola import errors
from omnismola import schema
from omnismola import storage
from omnismola.data import mixtures

# Every study trains and scores on the built-in synthetic suite.
TASKS = tuple(mixtures.task_names(mixtures.SYNTHETIC_MIX))

# The repository's configs/: studies are the papers' configs plus changes.
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), "configs")

class Stopped(Exception):
  """A run was stopped (SIGTERM) with its checkpoint saved."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the command line decides for every study."""
  quick: bool
  seeds: int
  tfds_data_dir: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """One trained model. `tasks`: the tasks it reports (empty: every task it
  evaluates). `starts_from`: the name of an earlier run whose checkpoint
  initialises this one. `parts_from`: (model subtree, earlier run's name,
  that run's subtree) triples loaded after it (`init.parts`)."""
  name: str
  arm: str
  seed: int
  config: ml_collections.ConfigDict
  tasks: tuple[str, ...] = ()
  starts_from: str | None = None
  parts_from: tuple[tuple[str, str, str], ...] = ()

  def depends_on(self) -> list[str]:
    """The earlier runs this one starts from."""
    return ([self.starts_from] if self.starts_from else []) + [
        run_name for _, run_name, _ in self.parts_from]


@dataclasses.dataclass(frozen=True)
class Table:
  """Rows `arms` of the results, written as one table and one plot."""
  key: str
  title: str
  arms: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Scale:
  """How big a study's runs are: the model preset, the global batch, the
  steps of one run, and the examples and tokens each task is scored on;
  by default the studies' full scale."""
  preset: str = "small"
  batch_size: int = 32
  steps: int = 300
  eval_examples: int = 256
  max_new_tokens: int = 32


# --quick: the machinery in a few seconds a run, not the numbers.
QUICK = Scale(preset="tiny", batch_size=12, steps=3, eval_examples=4,
              max_new_tokens=4)


def configure(c: ml_collections.ConfigDict, scale: Scale,
              settings: Settings, *, seed: int = 0, steps: int = 0,
              lr: float = 0.0) -> ml_collections.ConfigDict:
  """`c` at the study's scale: batch, a schedule of `steps` (default the
  scale's; warm-up a tenth, one checkpoint at the end), `lr` (default the
  config's), the seed, the data dir and what evaluation scores."""
  steps = steps or scale.steps
  c.seed = seed
  if settings.tfds_data_dir:
    c.data.tfds_data_dir = settings.tfds_data_dir
  c.train.update(batch_size=scale.batch_size, steps=steps,
                 lr=lr or c.train.lr, warmup_steps=max(1, steps // 10),
                 log_every=max(1, steps // 6), checkpoint_every=steps,
                 keep_checkpoints=1)
  # Each run is scored once, at its end, whatever the config's default.
  c.eval.update(every=0, at_end=True, max_examples=scale.eval_examples,
                max_new_tokens=scale.max_new_tokens)
  return c


def copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked deep copy."""
  return ml_collections.ConfigDict(config.to_dict())


def load_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """configs/<name> with `arg`, unlocked for the study to change."""
  path = os.path.join(CONFIGS_DIR, name)
  if not os.path.exists(path):
    raise errors.InputError(
        f"{path} does not exist: the studies build on the repository's "
        "configs/, so run them from a clone installed with `pip install -e`.")
  return config_lib.load_config_file(f"{path}:{arg}").unlock()


def cost(config) -> dict:
  """Parameters (trained, all) and model FLOPs of one train row (training step,
  forward alone), for the tables."""
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  parts = trainer.model_parts(config)
  trained, frozen = parts.params_template, parts.frozen_template
  count = lambda state: sum(int(np.prod(x.shape)) for x in
                            jax.tree.leaves(nnx.to_pure_dict(state)))
  train, forward = trainer.step_flops(config, parts)
  rows = int(config.train.batch_size)
  return dict(trainable_params=count(trained),
              params=count(trained) + count(frozen),
              train_flops=train.required / rows,
              forward_flops=forward.required / rows)


def _config_record(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def same_run(saved: dict, current: dict) -> bool:
  """Whether a result saved with config record `saved` stands for the run
  `current` describes: the same fields and values, except fields the saved
  record lacks (added to the schema since) that hold their defaults."""
  flat_saved, flat_current = schema.flatten(saved), schema.flatten(current)
  defaults = schema.flatten(
      _config_record(schema.base_config(current["model"]["preset"])))
  added = flat_current.keys() - flat_saved.keys()
  return (all(f in flat_current and flat_current[f] == value
              for f, value in flat_saved.items())
          and all(f in defaults and flat_current[f] == defaults[f]
                  for f in added))


def logged_losses(run_dir) -> list[tuple[int, float]]:
  """(step, training loss) of every line of the run's train_metrics.jsonl."""
  lines = (run_dir / "train_metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines if line.strip()]
  return [(r["step"], r["loss"]) for r in records if "loss" in r]


def train_run(run: Run, run_dir) -> dict | None:
  """Trains and evaluates `run` in `run_dir` (unless its result is there
  for the same config); returns and writes its result, or None when the
  run was stopped (its checkpoint saved) before it finished."""
  from omnismola.train import trainer  # pylint: disable=g-import-not-at-top
  result_path = run_dir / "result.json"
  config = _config_record(run.config)
  if result_path.exists():
    saved = json.loads(result_path.read_text())
    if same_run(saved["config"], config):
      return saved
  start = time.time()
  scores = trainer.train_and_evaluate(run.config, os.fspath(run_dir))
  if not scores:  # Stopped (SIGTERM) before its evaluation.
    return None
  tasks = run.tasks or tuple(scores)
  result = dict(
      name=run.name, arm=run.arm, seed=run.seed,
      scores={task: scores[task]["value"] for task in tasks},
      metrics={task: scores[task]["metric"] for task in tasks},
      steps=run.config.train.steps,
      examples=run.config.train.steps * run.config.train.batch_size,
      seconds=round(time.time() - start, 1), losses=logged_losses(run_dir),
      **cost(run.config), config=config)
  result_path.write_text(json.dumps(result, indent=2))
  return result


def select(runs: Sequence[Run], arms: Sequence[str]) -> list[Run]:
  """The runs of `arms` and every run they start from, in study order."""
  known = sorted({run.arm for run in runs})
  unknown = sorted(set(arms) - set(known))
  if unknown:
    raise errors.InputError(f"--arms: unknown {unknown}; this study's arms: "
                            f"{known}.")
  by_name = {run.name: run for run in runs}
  wanted = {run.name for run in runs if run.arm in arms}
  pending = list(wanted)
  while pending:
    for start in by_name[pending.pop()].depends_on():
      if start not in wanted:
        wanted.add(start)
        pending.append(start)
  return [run for run in runs if run.name in wanted]


def run_all(runs: Sequence[Run], workdir) -> list[dict]:
  """Trains `runs` in order under `workdir`, printing progress."""
  workdir = storage.path(workdir)
  results = []
  for index, run in enumerate(runs, 1):
    if run.depends_on():
      config = copy(run.config)
      if run.starts_from:
        config.init.checkpoint = os.fspath(workdir / run.starts_from)
      config.init.parts = tuple(
          (subtree, os.fspath(workdir / run_name), run_subtree)
          for subtree, run_name, run_subtree in run.parts_from)
      run = dataclasses.replace(run, config=config)
    print(f"\n=== [{index}/{len(runs)}] {run.name} (arm {run.arm}, seed "
          f"{run.seed}) ===", flush=True)
    result = train_run(run, workdir / run.name)
    if result is None:
      raise Stopped(f"Stopped during {run.name}; rerun the same command to "
                    "go on from there.")
    results.append(result)
    print(f"=== {run.name}: " + ", ".join(
        f"{task} {value:.2f}" for task, value in results[-1]["scores"].items())
          + f" ({results[-1]['seconds']:.0f}s) ===", flush=True)
  return results


@dataclasses.dataclass(frozen=True)
class ArmSummary:
  """One table row: per-task mean and sd over seeds, the average over
  tasks (per seed, then mean and sd), and the arm's cost."""
  arm: str
  seeds: int
  mean: dict[str, float]
  sd: dict[str, float]
  average: float
  average_sd: float
  trainable_params: int  # Of all of one seed's runs (specialists: summed).
  train_flops: float     # Per example, averaged over the arm's runs.
  forward_flops: float
  minutes: float         # All runs of all seeds.


def _sd(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def summarize(results: Sequence[dict], arm: str,
              tasks: Sequence[str]) -> ArmSummary | None:
  """The row of `arm` (None when it has no results)."""
  runs = [r for r in results if r["arm"] == arm]
  if not runs:
    return None
  seeds = sorted({r["seed"] for r in runs})
  per_seed = {s: {} for s in seeds}
  for r in runs:
    per_seed[r["seed"]].update(r["scores"])
  values = {t: [per_seed[s][t] for s in seeds if t in per_seed[s]]
            for t in tasks}
  averages = [float(np.mean([per_seed[s][t] for t in tasks])) for s in seeds
              if all(t in per_seed[s] for t in tasks)]
  first = [r for r in runs if r["seed"] == seeds[0]]
  return ArmSummary(
      arm=arm, seeds=len(seeds),
      mean={t: float(np.mean(v)) for t, v in values.items() if v},
      sd={t: _sd(v) for t, v in values.items() if v},
      average=float(np.mean(averages)) if averages else float("nan"),
      average_sd=_sd(averages),
      trainable_params=sum(r["trainable_params"] for r in first),
      train_flops=float(np.mean([r["train_flops"] for r in runs])),
      forward_flops=float(np.mean([r["forward_flops"] for r in runs])),
      minutes=sum(r["seconds"] for r in runs) / 60)


def _cell(mean: float, sd: float) -> str:
  if np.isnan(mean):
    return "–"
  return f"{mean:.1f}" if np.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def short_task(task: str) -> str:
  return task.removeprefix("synthetic_")


def markdown_table(summaries: Sequence[ArmSummary],
                   tasks: Sequence[str]) -> str:
  """Rows: arms; columns: tasks, their average, seeds and cost."""
  header = (["arm"] + [short_task(t) for t in tasks] +
            ["average", "seeds", "trained params", "train GFLOP/ex",
             "fwd GFLOP/ex", "minutes"])
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for s in summaries:
    cells = ([s.arm] + [_cell(s.mean.get(t, float("nan")),
                              s.sd.get(t, float("nan"))) for t in tasks] +
             [_cell(s.average, s.average_sd), str(s.seeds),
              f"{s.trainable_params:,}", f"{s.train_flops / 1e9:.3f}",
              f"{s.forward_flops / 1e9:.3f}", f"{s.minutes:.1f}"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(summaries: Sequence[ArmSummary], tasks: Sequence[str], title: str,
         path) -> None:
  """One panel per task and one for the average (each on its own scale:
  CIDEr dwarfs accuracies), a bar per arm, sd whiskers."""
  # A bare Figure draws with Agg into files: no display, no pyplot state.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  panels = [(short_task(t), [s.mean.get(t, np.nan) for s in summaries],
             [s.sd.get(t, np.nan) for s in summaries]) for t in tasks]
  panels.append(("average", [s.average for s in summaries],
                 [s.average_sd for s in summaries]))
  figure = Figure(figsize=(2.0 * len(panels), 3.4))
  axes = figure.subplots(1, len(panels))
  colors = [f"C{i}" for i in range(len(summaries))]
  for ax, (name, means, sds) in zip(axes, panels):
    ax.bar(range(len(summaries)), means, yerr=np.nan_to_num(sds),
           color=colors, capsize=2)
    finite = [m for m in means if np.isfinite(m)]
    if finite:  # Zoom on the differences between arms.
      low, high = min(finite), max(finite)
      pad = max(high - low, 0.05 * abs(high), 1e-3)
      ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_title(name, fontsize="medium")
    ax.set_xticks([])
  figure.legend([Patch(color=c) for c in colors],
                [s.arm for s in summaries], loc="lower center",
                ncols=min(len(summaries), 6), fontsize="small")
  figure.suptitle(title)
  figure.tight_layout(rect=(0, 0.1, 1, 1))
  with storage.path(path).open("wb") as f:
    figure.savefig(f, format="png", dpi=100)


def write_report(results: Sequence[dict], tables: Sequence[Table],
                 tasks: Sequence[str], workdir, title: str, command: str,
                 notes: str = "") -> str:
  """Writes results.json, results.md (the tables, then `notes`) and one PNG
  per table; returns the markdown."""
  workdir = storage.path(workdir)
  (workdir / "results.json").write_text(json.dumps(list(results), indent=2))
  parts = [f"# {title}", "", f"`{command}`", ""]
  for table in tables:
    summaries = [s for s in (summarize(results, arm, tasks)
                             for arm in table.arms) if s]
    if not summaries:
      continue
    plot(summaries, tasks, table.title, workdir / f"{table.key}.png")
    parts += [f"## {table.title}", "", markdown_table(summaries, tasks), "",
              f"![{table.title}]({table.key}.png)", ""]
  text = "\n".join(parts + ([notes, ""] if notes else []))
  (workdir / "results.md").write_text(text)
  return text


def use_compilation_cache(workdir) -> None:
  """Runs with one shape (seeds, specialists) compile once: XLA's
  persistent cache, beside a local workdir or in the temp folder."""
  location = (os.path.join(tempfile.gettempdir(), "omnismola_jax_cache")
              if storage.is_url(workdir) else
              os.path.join(os.fspath(storage.path(workdir)), "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", location)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _define_flags() -> dict:
  """The study command's flags, defined when a study runs as a command
  (not at import: omnismola.main defines --workdir too), listed by
  --help as the command's own."""
  options = dict(
      workdir=flags.DEFINE_string("workdir", None, "Where the study writes."),
      quick=flags.DEFINE_bool(
          "quick", False, "A few steps of the tiny preset: checks the "
          "machinery (arms built, parameters matched, tables and plots "
          "written), not the numbers."),
      arms=flags.DEFINE_list(
          "arms", [], "Arms to run (default: all); the runs they start from "
          "run too."),
      seeds=flags.DEFINE_integer(
          "seeds", None, "Seeds of the arms that take several (default: the "
          "study's; 1 with --quick)."),
      tfds_data_dir=flags.DEFINE_string(
          "tfds_data_dir", None, "config.data.tfds_data_dir of every run "
          "(default: configs/mix.py's)."))
  for holder in options.values():
    flags.FLAGS.register_key_flag_for_module(sys.argv[0],
                                             flags.FLAGS[holder.name])
  return options


def run_command(make_runs: Callable[[Settings], list[Run]],
                tables: Sequence[Table], title: str, default_seeds: int, *,
                notes: Callable[[list[dict]], str] = lambda results: ""
                ) -> None:
  """A study's command: trains what --arms selects, writes the report
  (the tables, then what `notes` says of the results). Bad input and a
  stopped run end it with one line and status 1."""
  options = _define_flags()

  def main(argv: Sequence[str]) -> None:
    del argv
    value = {name: holder.value for name, holder in options.items()}
    settings = Settings(
        quick=value["quick"],
        seeds=value["seeds"] or (1 if value["quick"] else default_seeds),
        tfds_data_dir=value["tfds_data_dir"])
    workdir = value["workdir"]
    start = time.time()
    try:
      if not workdir:
        raise errors.InputError("--workdir is required.")
      runs = make_runs(settings)
      if value["arms"]:
        runs = select(runs, value["arms"])
      use_compilation_cache(workdir)
      results = run_all(runs, workdir)
    except (errors.InputError, Stopped) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    command = " ".join(["python -m", sys.modules["__main__"].__spec__.name,
                        *sys.argv[1:]])
    report = write_report(results, tables, TASKS, workdir, title, command,
                          notes(results))
    print("\n" + report)
    print(f"\nStudy written to {workdir} in "
          f"{(time.time() - start) / 60:.1f} minutes.")

  app.run(main)
