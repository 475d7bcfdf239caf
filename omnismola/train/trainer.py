"""The training loop: sharded init or resume, jitted steps, checkpoints, evals.

Reading order: `TrainState`, `ModelParts`, `create_state`, `setup`,
`make_train_step` (train/loss.py's objective), then `train_and_evaluate`, a
loop of steps and hooks (train/hooks.py).
"""
import contextlib
import dataclasses
import functools
import sys
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from omnismola import build
from omnismola import errors
from omnismola import flops as flops_lib
from omnismola import row_layout
from omnismola import schema
from omnismola import storage
from omnismola.eval import runner
from omnismola.experts import stats
from omnismola.models import layers
from omnismola.train import checkpoint as checkpoint_lib
from omnismola.train import guards
from omnismola.train import hooks as hooks_lib
from omnismola.train import host_shards
from omnismola.train import init as init_lib
from omnismola.train import logging as log_lib
from omnismola.train import loss as loss_lib
from omnismola.train import optim
from omnismola.train import partitioning
from omnismola.train import profiler
from omnismola.train import resume


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as plain pytrees of arrays;
  frozen parameters (no gradients, no optimizer state) kept apart."""
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelParts:
  """How to turn (params, frozen) arrays back into the NNX model."""
  graphdef: Any
  params_template: nnx.State
  frozen_template: nnx.State

  def merge(self, params, frozen) -> nnx.Module:
    return nnx.merge(self.graphdef, _fill(self.params_template, params),
                     _fill(self.frozen_template, frozen))


def _fill(template: nnx.State, values) -> nnx.State:
  state = jax.tree.map(lambda x: x, template)  # A copy: templates stay intact.
  nnx.replace_by_pure_dict(state, values)
  return state


def opt_state_shardings(opt_state, params_shardings, mesh):
  """Optimizer leaves mirroring a parameter take its sharding; others replicate.
  A leaf whose key path ends with a parameter's is that parameter's moment.
  """
  by_path = {tuple(path): s for path, s in
             jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

  def one(path, _):
    for start in range(len(path)):
      if tuple(path[start:]) in by_path:
        return by_path[tuple(path[start:])]
    return partitioning.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, opt_state)


def model_parts(config) -> ModelParts:
  """The ModelParts of `config`'s model, from its shapes alone."""
  abstract_model = nnx.eval_shape(lambda: build.build_model(config))
  graphdef, params_t, frozen_t = nnx.split(
      abstract_model, optim.trainable_filter(config.train.trainable), ...)
  if not jax.tree.leaves(params_t):
    raise ValueError(f"config.train.trainable={config.train.trainable!r} "
                     "matches no parameter: nothing would be trained.")
  return ModelParts(graphdef, params_t, frozen_t)


def abstract_state(parts: ModelParts, optimizer) -> TrainState:
  """The train state's shapes and dtypes (no shardings)."""
  params = nnx.to_pure_dict(parts.params_template)
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                    frozen=nnx.to_pure_dict(parts.frozen_template),
                    opt_state=jax.eval_shape(optimizer.init, params))


def create_state(config, mesh, optimizer):
  """Returns (init_fn, abstract state with shardings, ModelParts); `init_fn`
  is jitted with out_shardings, so no device ever holds the whole model."""
  parts = model_parts(config)
  abstract = abstract_state(parts, optimizer)
  rules = partitioning.config_rules(config)

  def init_fn(key):
    model = build.build_model(config, rng=key)
    _, params, frozen = nnx.split(
        model, optim.trainable_filter(config.train.trainable), ...)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=frozen, opt_state=optimizer.init(params))

  params_sh = partitioning.state_shardings(parts.params_template, rules, mesh)
  shardings = TrainState(
      step=partitioning.replicated(mesh), params=params_sh,
      frozen=partitioning.state_shardings(parts.frozen_template, rules, mesh),
      opt_state=opt_state_shardings(abstract.opt_state, params_sh, mesh))
  return (jax.jit(init_fn, out_shardings=shardings),
          checkpoint_lib.abstract_with_shardings(abstract, shardings), parts)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What training, evaluation and the compile check build first from a
  config (the model's sharded state from `create_state`)."""
  mesh: jax.sharding.Mesh
  rules: list[tuple]
  optimizer: optax.GradientTransformation
  init_fn: Callable[[jax.Array], TrainState]
  abstract: TrainState
  parts: ModelParts


def setup(config, optimizer: optax.GradientTransformation | None = None
          ) -> Setup:
  """The Setup of `config`; its optimizer is config.train's unless given
  (e.g. optax.identity() where nothing is trained)."""
  mesh = partitioning.make_mesh(dict(config.mesh))
  if optimizer is None:
    optimizer = optim.make_optimizer(config.train)
  init_fn, abstract, parts = create_state(config, mesh, optimizer)
  return Setup(mesh, partitioning.config_rules(config), optimizer, init_fn,
               abstract, parts)


def cast_floats(tree, dtype):
  """Floating-point leaves as `dtype`; integer leaves (ids, masks) unchanged."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def split_microbatches(batch: dict, num: int) -> dict:
  """[B, ...] arrays -> [num, B / num, ...]; microbatch i gets rows i::num,
  so that every microbatch spans all data-parallel devices."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(
          x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1), batch)


def all_finite(tree) -> jax.Array:
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))
  # Through a conditional, which XLA does not fuse: otherwise it copies
  # the whole check into every consumer's fusion (each leaf's select in
  # the train step), quadratic in the number of parameter arrays: minutes
  # of compilation on CPU.
  return jax.lax.cond(finite, lambda: jnp.bool_(True),
                      lambda: jnp.bool_(False))


def make_train_step(parts: ModelParts, optimizer, schedule, num_tasks: int, *,
                    compute_dtype=jnp.float32, microbatches: int = 1,
                    aux_loss_weights: dict | None = None):
  """train_step(state, batch) -> (state, metrics), to be jitted; its options
  and skipped non-finite steps: docs/training.md ("One train step")."""
  aux_loss_weights = dict(aux_loss_weights or {})

  def objective(params, frozen, batch, aux_scale):
    """Summed target NLL (not the mean, so microbatch gradients add up),
    plus the routers' weighted auxiliary losses times `aux_scale`."""
    model = parts.merge(cast_floats(params, compute_dtype),
                        cast_floats(frozen, compute_dtype))
    logits, aux = model.forward(batch["image"].astype(compute_dtype),
                                batch["text"], batch["mask_ar"],
                                batch["mask_input"], batch.get("segment_ids"))
    nll, count = loss_lib.target_nll(logits, batch["text"], batch["mask_loss"])
    aux_loss = stats.weighted_aux_loss(aux, aux_loss_weights)
    return (jnp.sum(nll) + aux_scale * aux_loss,
            (nll, count, aux_loss, stats.routing_metrics(aux)))

  grad_fn = jax.grad(objective, has_aux=True)

  def train_step(state: TrainState, batch):
    micro = split_microbatches(batch, microbatches)
    tokens = jnp.maximum(jnp.sum(loss_lib.target_weights(batch["mask_loss"])), 1.0)
    # Gradients are divided by `tokens` below: scaled so, each microbatch's
    # auxiliary loss enters the step as its mean over microbatches.
    aux_scale = tokens / microbatches

    def accumulate(grads, one):
      g, outputs = grad_fn(state.params, state.frozen, one, aux_scale)
      return jax.tree.map(jnp.add, grads, g), outputs

    grads, (nll, count, aux_loss, routing) = jax.lax.scan(
        accumulate, jax.tree.map(jnp.zeros_like, state.params), micro)
    loss = jnp.sum(nll) / tokens
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = all_finite((loss, grads, params))
    keep_if_finite = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    task = jax.vmap(loss_lib.target_tasks)(micro).reshape(-1)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": schedule(state.step),
        "target_tokens": jnp.sum(count),
        "examples": loss_lib.count_examples(batch),
        "aux_loss": jnp.mean(aux_loss),
        **{k: jnp.mean(v) for k, v in routing.items()},
        "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
        # Sums per task, turned into per-task losses when logged.
        "task_nll": jax.ops.segment_sum(nll.reshape(-1), task, num_tasks),
        "task_tokens": jax.ops.segment_sum(count.reshape(-1), task,
                                           num_tasks),
    }
    new_state = state.replace(
        step=state.step + 1, params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state))
    return new_state, metrics

  return train_step


def jit_train_step(config, parts: ModelParts, optimizer, abstract: TrainState,
                   num_tasks: int):
  """The jitted train step with `abstract`'s shardings (none: XLA's),
  state donated; batches keep theirs (`host_shards.make_put_batch`)."""
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  step = make_train_step(
      parts, optimizer, optim.learning_rate_schedule(config.train), num_tasks,
      compute_dtype=jnp.dtype(config.train.compute_dtype),
      microbatches=int(config.train.microbatches),
      aux_loss_weights=dict(config.train.aux_loss_weights))
  return jax.jit(step, in_shardings=(state_shardings, None),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def check_replication(config, built: Setup) -> float:
  """Share of parameter bytes every device holds whole; an error above
  `config.train.max_replicated_fraction` (partitioning.check_replication)."""
  parameters = partitioning.parameter_layouts(
      [built.parts.params_template, built.parts.frozen_template],
      built.rules, built.mesh)
  return partitioning.check_replication(
      parameters, built.mesh, float(config.train.max_replicated_fraction))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from <workdir>/checkpoints if any), then evaluates;
  returns the final evaluation results (empty if evaluation is off)."""
  from omnismola.data import pipeline  # TensorFlow only from here on.

  schema.check(config)
  check_model_inputs(config, pipeline)
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  built = setup(config)
  logging.info("Mesh: %s", dict(built.mesh.shape))
  task_names = pipeline.mixture_task_names(config.data)
  _log_parameter_counts(built.abstract, check_replication(config, built))

  # Closed however the run ends, so that no save or read is left to
  # orbax's threads at exit (a failed start printed their traceback).
  with contextlib.closing(checkpoint_lib.Checkpointer(
      workdir / "checkpoints", keep=config.train.keep_checkpoints)) as ckpt:
    # A config that changes what the run trains stops it here, before
    # anything is written.
    restored = ckpt.restore_latest(
        built.abstract,
        check_config=functools.partial(resume.resumed_config, config))
    writer = log_lib.MetricWriter(workdir)
    # Lines after the restored step (or all, without one) are a dead run's;
    # process 0 alone writes the file.
    if writer.enabled:
      log_lib.truncate_after(writer.path, restored.step if restored else 0)
    if restored is None:
      optimizer, state, data_state = (
          built.optimizer, _fresh_state(config, built), None)
    else:
      config = resume.resumed_config(config, restored.config, restored.step)
      # Its schedule may start anew (train.extend); the optimizer state's
      # structure does not depend on the schedule.
      optimizer = optim.make_optimizer(config.train)
      state, data_state = restored.state, restored.data
      log_lib.print_line(f"Resuming from the checkpoint of step "
                         f"{restored.step}.")
    _record_config(config, workdir)

    pipeline.prepare(config.data)
    batch_size = config.train.batch_size
    shard = host_shards.host_shard(built.mesh, built.rules, batch_size)
    train_iter = pipeline.make_train_iterator(
        config.data, global_batch_size=batch_size, seed=config.seed,
        shard_index=shard.index, shard_count=shard.count, state=data_state)
    put_batch = host_shards.make_put_batch(built.mesh, built.rules, shard)
    train_step = jit_train_step(config, built.parts, optimizer,
                                built.abstract, len(task_names))

    run_eval = runner.make_eval_runner(config, workdir, built, pipeline)
    total = int(config.train.steps)
    step = int(jax.device_get(state.step))
    tokens, row_flops = row_cost(config, built.parts)
    progress = log_lib.Progress(
        step, total, batch_size, tokens_per_row=tokens,
        flops_per_row=row_flops, num_devices=jax.device_count(),
        peak_flops=flops_lib.peak_flops(jax.devices()[0].device_kind))
    trace = profiler.StepTrace(int(config.profile.first_step),
                               int(config.profile.steps),
                               workdir / "profile")
    guard = guards.NonFiniteGuard(int(config.train.max_nonfinite_steps))
    save = lambda step, state: ckpt.save(step, state, train_iter.get_state(),
                                         config.to_dict())
    # Cumulative over-length counts of every host's input (a collective).
    input_metrics = lambda: pipeline.over_length_metrics(
        config.data, checkpoint_lib.all_process_states(train_iter.get_state()))
    hooks = [trace.after_step, guard,
             hooks_lib.log(config.train.log_every, total, task_names,
                           progress, writer, input_metrics),
             hooks_lib.checkpoint(config.train.checkpoint_every, total, save),
             hooks_lib.evaluate(config.eval.every, total, run_eval, progress)]
    # Activations pinned to their logical sharding wherever it is traced.
    with (guards.StopSignal() as stop, contextlib.closing(writer),
          contextlib.closing(trace),
          layers.activation_sharding(
              partitioning.activation_sharding(built.mesh, built.rules))):
      while step < total and not stop.requested:
        trace.before_step(step + 1)
        state, metrics = train_step(state, put_batch(next(train_iter)))
        step += 1
        for hook in hooks:
          hook(step, state, metrics)
      guard.flush()
      if stop.requested and step < total:
        save(step, state)
        ckpt.wait()
        log_lib.print_line(f"Stopped by SIGTERM at step {step}; checkpoint "
                           "saved. Re-run the same command to resume.")
        return {}
    return run_eval(step, state) if config.eval.at_end else {}


def _fresh_state(config, built: Setup) -> TrainState:
  """A new state, with the parameters of config.init.checkpoint and
  config.init.parts if they name any."""
  state = built.init_fn(jax.random.key(config.seed))
  if not (config.init.checkpoint or config.init.parts):
    return state
  return init_lib.load_partial(
      config.init.checkpoint, state, built.abstract, parts=config.init.parts,
      upcycle=config.init.upcycle,
      upcycle_noise_std=config.init.upcycle_noise_std, seed=config.seed)


def check_model_inputs(config, pipeline, checkpoint: str | None = None
                       ) -> None:
  """config.model made to agree with `checkpoint` (init_lib), and the
  vocabulary checked against it; a mismatch is an InputError."""
  init_lib.agree_with_checkpoint(config, checkpoint)
  try:
    build.check_vocabulary_fits(config.model,
                                pipeline.get_vocabulary(config.data),
                                config.data.vocabulary)
  except ValueError as e:
    raise errors.InputError(str(e)) from None


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=eval: evaluates the latest checkpoint of `workdir`, or, when it
  has none, the parameters of config.init.checkpoint and config.init.parts
  (zero-shot, as step 0). The data is checked before any parameter is read.
  """
  from omnismola.data import pipeline  # TensorFlow only from here on.

  schema.check(config)
  workdir = storage.path(workdir)
  step_dir = init_lib.find_step_dir(workdir / "checkpoints")
  # The model is the workdir's when it has a checkpoint, else init's.
  check_model_inputs(config, pipeline, step_dir)
  pipeline.prepare(config.data)
  # A training state is restored with its optimizer state; fresh
  # parameters, which nothing trains, need none.
  built = setup(config, optax.identity() if step_dir is None else None)
  run_eval = runner.make_eval_runner(config, workdir, built, pipeline)
  if step_dir is None:
    if not (config.init.checkpoint or config.init.parts):
      raise errors.InputError(
          f"No checkpoint in {workdir / 'checkpoints'} to evaluate: train "
          "first with --mode=train, or evaluate a pretrained model's "
          "parameters with --config.init.checkpoint=DIR (e.g. python -m "
          "omnismola.convert's output).")
    source = (f"config.init.checkpoint={config.init.checkpoint}"
              if config.init.checkpoint else "config.init.parts")
    log_lib.print_line(f"No checkpoint in {workdir}: evaluating {source} "
                       "as it is (zero-shot, step 0).")
    return run_eval(0, _fresh_state(config, built))
  if config.init.checkpoint:
    log_lib.print_line(f"Evaluating the workdir's checkpoint of step "
                       f"{step_dir.name}; it takes precedence over "
                       f"config.init.checkpoint={config.init.checkpoint}.")
  with contextlib.closing(checkpoint_lib.Checkpointer(
      workdir / "checkpoints", keep=config.train.keep_checkpoints,
      read_only=True)) as ckpt:
    restored = ckpt.restore_latest(built.abstract)
  return run_eval(restored.step, restored.state)


def abstract_batch(config, mesh=None) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch's shapes and dtypes (row_layout.py), sharded on
  `mesh` if given."""
  rules = partitioning.config_rules(config)
  shapes = row_layout.batch_shapes(row_layout.row_layout(config.data),
                                   int(config.train.batch_size),
                                   int(config.model.vit.image_size))
  sharding = lambda shape: (None if mesh is None else
                            partitioning.batch_sharding(mesh, rules, shape))
  return {key: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                    sharding=sharding(shape))
          for key, (shape, dtype) in shapes.items()}


def step_flops(config, parts: ModelParts | None = None
               ) -> tuple[flops_lib.Count, flops_lib.Count]:
  """FLOPs of one train step of `config` and of the forward pass on its
  batch, counted from the traced programs (flops.py) with the model's
  `parts` if given; nothing is compiled or run."""
  parts = parts or model_parts(config)
  optimizer = optim.make_optimizer(config.train)
  state = abstract_state(parts, optimizer)
  batch = abstract_batch(config)
  train_step = jit_train_step(config, parts, optimizer, state, num_tasks=1)
  forward = lambda params, frozen, batch: parts.merge(params, frozen).forward(
      batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"],
      batch.get("segment_ids"))
  return (flops_lib.count(train_step, state, batch),
          flops_lib.count(forward, state.params, state.frozen, batch))


def row_cost(config, parts: ModelParts | None = None) -> tuple[int, float]:
  """(tokens, required training FLOPs) of one train row, for throughput and
  MFU; tokens count padding (the model computes on it) and every image slot
  of a packed row."""
  model = build.vlm_config(config.model)
  layout = row_layout.row_layout(config.data)
  train, _ = step_flops(config, parts)
  return (layout.images * model.num_image_tokens + layout.text_length,
          train.required / int(config.train.batch_size))


def _log_parameter_counts(abstract: TrainState, replicated: float) -> None:
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  trained, frozen = count(abstract.params), count(abstract.frozen)
  log_lib.print_line(f"Parameters: {trained + frozen:,} "
                     f"({trained:,} trained, {frozen:,} frozen; "
                     f"{replicated:.1%} of the bytes whole on every device).")


def _record_config(config, workdir) -> None:
  """Writes the config the run uses to <workdir>/config.json (process 0)
  and prints what differs from the defaults, once, on stderr (stdout keeps
  the progress lines)."""
  path = workdir / "config.json"
  if jax.process_index() == 0:
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  log_lib.print_line(f"Config: {'; '.join(schema.changes(config))} "
                     f"(every field: {path}).", file=sys.stderr)
