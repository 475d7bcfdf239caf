r"""--mode=analyze: which experts a trained model uses, per task and modality.

  python -m omnismola.main --config=configs/mix.py --workdir=/tmp/mix \
      --mode=analyze

The model (as for --mode=predict) runs teacher-forced over the validation
examples of `eval.tasks` while every router records each token's weight on
each of its experts; the mean weights per task and modality go to
<workdir>/analysis/ (docs/experts.md, "Looking at expert usage").
"""
import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
# A bare Figure draws with Agg into files: no display, no pyplot state.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from omnismola import predict
from omnismola import storage
from omnismola.models import layers
from omnismola.train import logging as log_lib

MODALITIES = ("image", "prefix", "suffix")


def token_modalities(num_image_tokens: int, batch: dict) -> jax.Array:
  """int [B, N + L]: each position's index in MODALITIES, -1 where it does
  not count (text padding, padded examples)."""
  text = jnp.where(batch["mask_ar"] == 0, 1, 2)
  text = jnp.where(batch["mask_input"] == 1, text, -1)
  image = jnp.zeros((text.shape[0], num_image_tokens), text.dtype)
  modality = jnp.concatenate([image, text], axis=1)
  return jnp.where(batch["example_mask"][:, None] == 1, modality, -1)


def usage_sums(weights: jax.Array, modality: jax.Array):
  """(sums [..., M, E], served [..., M]) per modality of a router's weights
  [..., B, T, E] (a leading layer axis for a stack), given each token's
  modality [B, T] (-1: not counted); served: weights not all zero."""
  one_hot = jax.nn.one_hot(modality, len(MODALITIES))   # -1: all zeros.
  served = (jnp.sum(weights, axis=-1) > 0).astype(jnp.float32)
  return (jnp.einsum("...bte,btm->...me", weights.astype(jnp.float32),
                     one_hot),
          jnp.einsum("...bt,btm->...m", served, one_hot))


def collect(model: nnx.Module, task_batches) -> dict:
  """{router: (sums [K, L, M, E], served [K, L, M])} summed over the
  batches of the K tasks `task_batches` yields as (task, batches); L: the
  layers of the router's stack (1 outside one)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def usage_fn(state, batch):
    """{router path: usage_sums} of one batch."""
    model = nnx.merge(graphdef, state)
    with layers.recording_usage():
      _, reports = model.forward(batch["image"], batch["text"],
                                 batch["mask_ar"], batch["mask_input"])
    sequence = token_modalities(model.num_image_tokens, batch)
    # Routers before the decoder see the image tokens of each example only.
    image = jnp.where(batch["example_mask"][:, None] == 1, 0, -1)
    out = {}
    for router, report in reports.items():
      if "usage" in report:
        length = report["usage"].shape[-2]
        modality = (sequence if length == sequence.shape[1] else
                    jnp.broadcast_to(image, (image.shape[0], length)))
        out[router] = usage_sums(report["usage"], modality)
    return out

  keys = ("image", "text", "mask_ar", "mask_input", "example_mask")
  per_task = []
  for _, batches in task_batches:
    totals = {}
    for batch in batches:
      usage = jax.device_get(usage_fn(state, {k: batch[k] for k in keys}))
      for router, (sums, served) in usage.items():
        if served.ndim == 1:  # Outside a stack: one layer.
          sums, served = sums[None], served[None]
        summed = totals.get(router, (0, 0))
        totals[router] = (sums + summed[0], served + summed[1])
    per_task.append(totals)
  return {router: tuple(np.stack([totals[router][i] for totals in per_task])
                        for i in (0, 1))
          for router in sorted(per_task[0])}


def mean_weights(sums: np.ndarray, served: np.ndarray,
                 axis=()) -> np.ndarray:
  """sums [..., E] / served [...], both summed over `axis` first: the mean
  weight of each expert over the served tokens; NaN where none was served."""
  sums, served = np.sum(sums, axis), np.sum(served, axis)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(served[..., None] > 0, sums / served[..., None], np.nan)


def router_summary(sums: np.ndarray, served: np.ndarray,
                   tasks: list[str]) -> dict:
  """One router's numbers for usage.json (lists [layer][expert]; null where
  no token was served), from sums [K, L, M, E] and served [K, L, M]."""
  as_lists = lambda a: np.where(np.isnan(a), None, a).tolist()
  return {
      "layers": sums.shape[1],
      "experts": sums.shape[-1],
      "by_task": {t: as_lists(mean_weights(sums[k], served[k], 1))
                  for k, t in enumerate(tasks)},
      "by_modality": {m: as_lists(mean_weights(sums[:, :, i],
                                               served[:, :, i], 0))
                      for i, m in enumerate(MODALITIES)},
      "by_task_and_modality": {
          t: {m: as_lists(mean_weights(sums[k, :, i], served[k, :, i]))
              for i, m in enumerate(MODALITIES)}
          for k, t in enumerate(tasks)},
      "served_tokens": {
          t: {m: served[k, :, i].astype(int).tolist()
              for i, m in enumerate(MODALITIES)}
          for k, t in enumerate(tasks)},
  }


def plot_router(router: str, sums: np.ndarray, served: np.ndarray,
                tasks: list[str], path: str) -> None:
  """Heatmaps of one router's mean expert weights by task, modality and
  (in a stack) layer into the PNG `path`; grey cells: no served token."""
  panels = [
      ("task", tasks, mean_weights(sums, served, (1, 2))),
      ("modality", MODALITIES, mean_weights(sums, served, (0, 1))),
  ]
  if sums.shape[1] > 1:
    panels.append(("layer", [str(i) for i in range(sums.shape[1])],
                   mean_weights(sums, served, (0, 2))))
  finite = np.concatenate([m[np.isfinite(m)] for _, _, m in panels])
  rows = max(len(labels) for _, labels, _ in panels)
  figure = Figure(layout="constrained", figsize=(
      2 + len(panels) * (2 + min(0.3 * sums.shape[-1], 6)),
      max(4, 1.5 + 0.25 * rows)))
  axes = figure.subplots(1, len(panels), squeeze=False)[0]
  colors = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
  for ax, (name, labels, means) in zip(axes, panels):
    # One colour scale for all panels, so they compare at a glance.
    image = ax.imshow(means, cmap=colors, vmin=0,
                      vmax=finite.max() if finite.size else 1,
                      aspect="auto", interpolation="nearest")
    ax.set_title(f"by {name}")
    ax.set_xlabel("expert")
    ax.set_ylabel(name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(len(labels)), labels)
  figure.colorbar(image, ax=axes, label="mean weight")
  figure.suptitle(f"{router}: mean expert weight per served token")
  with storage.path(path).open("wb") as f:
    figure.savefig(f, format="png", dpi=100)


def analyze(config, workdir: str) -> list[str]:
  """Writes usage.json and the plots into <workdir>/analysis (process 0
  only: every process reads the same batches, so holds the same sums);
  their paths."""
  from omnismola.data import pipeline  # TensorFlow only from here on.

  workdir = storage.path(workdir)
  model = predict.load_model(config, workdir)
  pipeline.prepare(config.data)
  tasks = list(config.eval.tasks) or pipeline.mixture_task_names(config.data)

  def task_batches():
    for i, task in enumerate(tasks, 1):
      log_lib.print_line(f"Analyzing {task} ({i}/{len(tasks)}).")
      yield task, pipeline.make_labelled_batches(
          config.data, task, batch_size=config.eval.batch_size,
          max_examples=config.eval.max_examples or None)

  usage = collect(model, task_batches())
  if not usage:
    raise ValueError("The model has no router that records its usage: its "
                     "saved experts include no smola, sparse_moe or "
                     "sparse_lora entry, and its connector is not move.")
  out_dir = workdir / "analysis"
  written = [out_dir / "usage.json"] + [
      out_dir / (router.replace("/", ".") + ".png") for router in usage]
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    written[0].write_text(json.dumps(
        {"tasks": tasks, "modalities": list(MODALITIES),
         "routers": {router: router_summary(*arrays, tasks)
                     for router, arrays in usage.items()}}, indent=1))
    for (router, arrays), png in zip(usage.items(), written[1:]):
      plot_router(router, *arrays, tasks, png)
  return [os.fspath(p) for p in written]
