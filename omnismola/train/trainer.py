"""The training loop: sharded init or resume, jitted steps, checkpoints, evals.

Reading order: `TrainState` and `ModelParts` (what is trained and how the
model is rebuilt from arrays), `create_state` (sharded init from shapes) and
`setup` (everything an entry point builds first), `make_train_step`
(gradients and update of train/loss.py's objective), then
`train_and_evaluate`.
"""
import contextlib
import dataclasses
import functools
import signal
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
from omnismola import row_layout
from omnismola import storage
from omnismola.eval import decode as decode_lib
from omnismola.eval import evaluator
from omnismola.experts import stats
from omnismola.models import layers
from omnismola.train import checkpoint as checkpoint_lib
from omnismola import flops as flops_lib
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
  """Everything that changes during training, as plain pytrees of arrays.

  Frozen parameters are kept apart from the trained ones: they get no
  gradients and no optimizer state.
  """
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


def split_model(model: nnx.Module, trainable_regex: str):
  """(graphdef, trainable params, everything else) of a model."""
  return nnx.split(model, optim.trainable_filter(trainable_regex), ...)


def opt_state_shardings(opt_state, params_shardings, mesh):
  """Optimizer leaves mirroring a parameter take its sharding; others replicate.

  Optax states hold copies of the parameter tree (e.g. Adam's mu and nu), so
  a leaf whose key path ends with a parameter's key path is that parameter's
  moment.
  """
  by_path = {tuple(path): s for path, s in
             jax.tree_util.tree_flatten_with_path(params_shardings)[0]}

  def one(path, _):
    for start in range(len(path)):
      if tuple(path[start:]) in by_path:
        return by_path[tuple(path[start:])]
    return partitioning.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, opt_state)


def create_state(config, mesh, optimizer):
  """Returns (init_fn, abstract state with shardings, ModelParts).

  Parameters are created directly in their sharded layout: shapes come from
  `eval_shape`, shardings from the logical axes, and `init_fn` is jitted with
  those out_shardings, so no device ever holds the whole model first.
  """
  rules = partitioning.config_rules(config)
  abstract_model = nnx.eval_shape(lambda: build.build_model(config))
  graphdef, params_t, frozen_t = split_model(abstract_model,
                                             config.train.trainable)
  if not jax.tree.leaves(params_t):
    raise ValueError(f"config.train.trainable={config.train.trainable!r} "
                     "matches no parameter: nothing would be trained.")
  parts = ModelParts(graphdef, params_t, frozen_t)

  def init_fn(key):
    model = build.build_model(config, rng=key)
    _, params, frozen = split_model(model, config.train.trainable)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=frozen, opt_state=optimizer.init(params))

  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  params_sh = partitioning.state_shardings(params_t, rules, mesh)
  shardings = TrainState(
      step=partitioning.replicated(mesh), params=params_sh,
      frozen=partitioning.state_shardings(frozen_t, rules, mesh),
      opt_state=opt_state_shardings(abstract.opt_state, params_sh, mesh))
  abstract = checkpoint_lib.abstract_with_shardings(abstract, shardings)
  init_fn = jax.jit(init_fn, out_shardings=shardings)
  return init_fn, abstract, parts


@dataclasses.dataclass(frozen=True)
class Setup:
  """What training, evaluation and the compile check build first from a
  config: the device mesh, its sharding rules, the optimizer and the
  model's sharded state (`create_state`)."""
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
  """[B, ...] arrays -> [num, B / num, ...]; microbatch i gets rows i::num.

  Strided rather than contiguous rows: each device's contiguous shard of the
  batch then splits evenly, so every microbatch spans all data-parallel
  devices instead of sitting on a few of them.
  """
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"The batch of {x.shape[0]} does not split into "
                       f"config.train.microbatches={num} equal parts.")
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]),
                        0, 1)

  return jax.tree.map(split, batch)


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
  """train_step(state, batch) -> (state, metrics), to be jitted.

  The forward and backward passes run in `compute_dtype` on copies of the
  float32 master weights; loss, gradients and optimizer state stay float32.
  The batch is processed in `microbatches` sequential parts (a scan) whose
  gradients add up to the full batch's. A step whose loss, gradients or
  updated parameters are not finite changes nothing but `step`, and says so
  in `metrics["nonfinite"]`. Routers' auxiliary losses are added with
  `aux_loss_weights` (see experts/stats.py) and logged with their routing
  statistics.
  """
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

  def accumulate(params, frozen, micro, aux_scale):
    """Summed gradients and per-microbatch outputs [M, ...] by a scan."""
    grad_fn = jax.grad(objective, has_aux=True)

    def body(grads, batch):
      g, outputs = grad_fn(params, frozen, batch, aux_scale)
      return jax.tree.map(jnp.add, grads, g), outputs

    return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), micro)

  def train_step(state: TrainState, batch):
    micro = split_microbatches(batch, microbatches)
    tokens = jnp.maximum(jnp.sum(loss_lib.target_weights(batch["mask_loss"])), 1.0)
    # Gradients are divided by `tokens` below: scaled so, each microbatch's
    # auxiliary loss enters the step as its mean over microbatches.
    grads, (nll, count, aux_loss, routing) = accumulate(
        state.params, state.frozen, micro, tokens / microbatches)
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
  """The jitted train step with the state's shardings, state donated.

  `abstract` carries the shardings (from `create_state`); batches keep the
  sharding they arrive with (`make_put_batch`).
  """
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


def summarize(step_metrics: list[dict], task_names: list[str]) -> dict:
  """Averages the metrics of the steps since the last log line.

  Skipped (non-finite) steps are counted, and left out of the averages
  unless every step was skipped.
  """
  host = jax.device_get(step_metrics)
  applied = [m for m in host if not m["nonfinite"]] or host
  averaged = ["loss", "grad_norm", "learning_rate", "aux_loss"] + [
      k for k in host[0] if k.startswith("moe/")]
  out = {k: float(np.mean([m[k] for m in applied])) for k in averaged}
  out["skipped_steps"] = float(sum(m["nonfinite"] for m in host))
  out["target_tokens_per_step"] = float(
      np.mean([m["target_tokens"] for m in applied]))
  # Every step consumed its examples, applied or not.
  out["examples_per_step"] = float(np.mean([m["examples"] for m in host]))
  nll = np.sum([m["task_nll"] for m in applied], axis=0)
  tokens = np.sum([m["task_tokens"] for m in applied], axis=0)
  for name, n, t in zip(task_names, nll, tokens):
    if t > 0:
      out[f"loss/{name}"] = float(n / t)
  return out


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or update."""


class NonFiniteGuard:
  """Gives up after `limit` consecutive skipped (non-finite) steps.

  The step function already refuses non-finite updates, so the state (and
  every checkpoint of it) stays finite; this only decides when skipping has
  become hopeless. Each step's flag is read after the next step has been
  dispatched, so the host never makes the device wait.
  """

  def __init__(self, limit: int):
    if limit < 1:
      raise ValueError("config.train.max_nonfinite_steps must be >= 1, got "
                       f"{limit}.")
    self.limit = limit
    self.streak = 0
    self._unread = None  # (step, flag) of the latest step.

  def observe(self, step: int, flag: jax.Array) -> None:
    unread, self._unread = self._unread, (step, flag)
    if unread is not None:
      self._check(*unread)

  def flush(self) -> None:
    if self._unread is not None:
      self._check(*self._unread)
      self._unread = None

  def _check(self, step: int, flag: jax.Array) -> None:
    if not int(flag):
      self.streak = 0
      return
    self.streak += 1
    logging.warning("Step %d: non-finite loss, gradient or update; update "
                    "skipped (%d in a row).", step, self.streak)
    if self.streak >= self.limit:
      raise NonFiniteError(
          f"Steps {step - self.streak + 1}-{step}: the loss, gradients or "
          f"updated parameters were non-finite {self.streak} times in a row "
          f"(config.train.max_nonfinite_steps={self.limit}); every such "
          "update was skipped and nothing non-finite was checkpointed. "
          "Stopping: lower config.train.lr, check the data, or resume from "
          "the last checkpoint.")


def make_decode_fn(parts: ModelParts, mesh, rules,
                   shard: host_shards.HostShard, max_new_tokens: int,
                   eos_id: int):
  """decode_fn(state, host_batch) -> this host's generated ids [B, N].

  Every host passes the rows of its `shard` of the global batch; the decode
  runs once over the global batch, and each host gets back the rows of its
  own batch, in order.
  """
  put_batch = make_put_batch(mesh, rules, shard)

  @jax.jit
  def decode(params, frozen, batch):
    model = parts.merge(params, frozen)
    tokens = decode_lib.greedy_decode(model, batch,
                                      max_new_tokens=max_new_tokens,
                                      eos_id=eos_id)
    # Laid out like the prompt, so each host's rows stay on its devices.
    return jax.lax.with_sharding_constraint(
        tokens, partitioning.batch_sharding(mesh, rules, tokens.shape))

  def decode_fn(state: TrainState, batch: dict):
    prompt = put_batch({k: batch[k] for k in decode_lib.PROMPT_KEYS})
    return partitioning.process_local_rows(
        decode(state.params, state.frozen, prompt))

  return decode_fn


def make_put_batch(mesh, rules, shard: host_shards.HostShard | None = None
                   ) -> Callable[[dict], dict]:
  """Host-local numpy batch -> global arrays sharded over the batch axes.

  The local batch is shard `shard` (`host_shards.host_shard`) of a global
  batch `shard.count` times larger; by default every process is its own
  shard. A mesh that lays the rows out otherwise is an error here rather
  than a silently mis-assembled batch.
  """
  shard = shard or host_shards.HostShard(jax.process_index(),
                                         jax.process_count())
  checked_sizes = set()

  def check(global_rows: int) -> None:
    laid_out = host_shards.host_shard(mesh, rules, global_rows)
    if laid_out != shard:
      raise ValueError(
          f"A global batch of {global_rows} rows puts shard {laid_out} on "
          f"this process, but its input was read as shard {shard}; read it "
          "with host_shards.host_shard(mesh, rules, batch size).")
    checked_sizes.add(global_rows)

  def put(batch: dict) -> dict:
    out = {}
    for key, local in batch.items():
      if not isinstance(local, np.ndarray):
        continue  # e.g. reference strings stay on the host.
      global_shape = (local.shape[0] * shard.count,) + local.shape[1:]
      if global_shape[0] not in checked_sizes:
        check(global_shape[0])
      sharding = partitioning.batch_sharding(mesh, rules, global_shape)
      out[key] = jax.make_array_from_process_local_data(sharding, local,
                                                        global_shape)
    return out

  return put


class _StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. a notebook worker).
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing, then stopping.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from <workdir>/checkpoints if any), then evaluates.

  Returns the final evaluation results (empty if evaluation is off).
  """
  from omnismola.data import pipeline  # TensorFlow only from here on.

  check_model_inputs(config, pipeline)
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  built = setup(config)
  mesh, rules, optimizer = built.mesh, built.rules, built.optimizer
  abstract, parts = built.abstract, built.parts
  logging.info("Mesh: %s", dict(mesh.shape))
  task_names = pipeline.mixture_task_names(config.data)
  _log_parameter_counts(abstract, check_replication(config, built))

  # Closed however the run ends, so that no save or read is left to
  # orbax's threads at exit (a failed start printed their traceback).
  with contextlib.closing(checkpoint_lib.Checkpointer(
      workdir / "checkpoints", keep=config.train.keep_checkpoints)) as ckpt:
    # A config that changes what the run trains stops it here, before
    # anything is written.
    restored = ckpt.restore_latest(
        abstract, check_config=functools.partial(resume.resumed_config, config))
    writer = log_lib.MetricWriter(workdir)
    # Lines after the restored step (or all, without one) are a dead run's;
    # process 0 alone writes the file.
    if writer.enabled:
      log_lib.truncate_after(writer.path, restored.step if restored else 0)
    if restored is not None:
      state, data_state = restored.state, restored.data
      config = resume.resumed_config(config, restored.config, restored.step)
      # Its schedule may start anew (train.extend); the optimizer state's
      # structure does not depend on the schedule.
      optimizer = optim.make_optimizer(config.train)
      log_lib.print_line(f"Resuming from the checkpoint of step "
                         f"{restored.step}.")
    else:
      state, data_state = built.init_fn(jax.random.key(config.seed)), None
      if config.init.checkpoint:
        state = init_lib.load_partial(
            config.init.checkpoint, state, abstract,
            upcycle=config.init.upcycle,
            upcycle_noise_std=config.init.upcycle_noise_std, seed=config.seed)

    pipeline.prepare(config.data)
    batch_size = config.train.batch_size
    # Hosts holding the same batch rows read the same shard (host_shards.py).
    shard = host_shards.host_shard(mesh, rules, batch_size)
    train_iter = pipeline.make_train_iterator(
        config.data, global_batch_size=batch_size, seed=config.seed,
        shard_index=shard.index, shard_count=shard.count, state=data_state)
    put_batch = make_put_batch(mesh, rules, shard)
    train_step = jit_train_step(config, parts, optimizer, abstract,
                                len(task_names))

    run_eval = _make_eval_runner(config, workdir, built, pipeline)
    guard = NonFiniteGuard(int(config.train.max_nonfinite_steps))
    total = int(config.train.steps)
    step = int(jax.device_get(state.step))
    tokens, row_flops = row_cost(config)
    progress = log_lib.Progress(
        step, total, batch_size, tokens_per_row=tokens,
        flops_per_row=row_flops, num_devices=jax.device_count(),
        peak_flops=flops_lib.peak_flops(jax.devices()[0].device_kind))
    trace = profiler.StepTrace(int(config.profile.first_step),
                               int(config.profile.steps),
                               workdir / "profile")
    pending: list[dict] = []
    # Saves the loop's current step and state (read when called).
    save = lambda: ckpt.save(step, state, train_iter.get_state(),
                             config.to_dict())
    # Activations are pinned to their logical sharding wherever the step
    # is traced.
    with (_StopSignal() as stop, contextlib.closing(writer),
          contextlib.closing(trace),
          layers.activation_sharding(
              partitioning.activation_sharding(mesh, rules))):
      while step < total and not stop.requested:
        trace.before_step(step + 1)
        state, metrics = train_step(state, put_batch(next(train_iter)))
        step += 1
        trace.after_step(step, metrics)
        guard.observe(step, metrics["nonfinite"])
        pending.append(metrics)
        if step == progress.first_step + 1:  # Exclude compilation from rates.
          jax.block_until_ready(metrics)
          progress.start(step)
        if step % config.train.log_every == 0 or step == total:
          scalars = summarize(pending, task_names)
          scalars.update(progress.update(step, scalars["examples_per_step"]))
          scalars.update(log_lib.peak_memory())
          # Cumulative over-length counts of every host's input (a collective).
          scalars.update(pipeline.over_length_metrics(
              config.data, checkpoint_lib.all_process_states(
                  train_iter.get_state())))
          pending = []
          writer.write(step, scalars)
          log_lib.print_line(progress.line(step, scalars["loss"],
                                           scalars.get("examples_per_sec")))
        if step % config.train.checkpoint_every == 0 or step == total:
          save()
        if config.eval.every and step % config.eval.every == 0 and step < total:
          with progress.pause():  # Rates and ETA are of training steps.
            run_eval(step, state)
      guard.flush()
      if stop.requested and step < total:
        save()
        ckpt.wait()
        log_lib.print_line(f"Stopped by SIGTERM at step {step}; checkpoint "
                           "saved. Re-run the same command to resume.")
        return {}
    return run_eval(step, state) if config.eval.at_end else {}


def check_model_inputs(config, pipeline, checkpoint: str | None = None
                       ) -> None:
  """config.model made to agree with `checkpoint` (default
  config.init.checkpoint; in place), and the vocabulary checked against it,
  before anything is built or written; a mismatch is an InputError naming
  the fields."""
  init_lib.agree_with_checkpoint(config, checkpoint)
  try:
    build.check_vocabulary_fits(config.model,
                                pipeline.get_vocabulary(config.data),
                                config.data.vocabulary)
  except ValueError as e:
    raise errors.InputError(str(e)) from None


def evaluate_checkpoint(config, workdir: str) -> dict:
  """--mode=eval: evaluates the latest checkpoint of `workdir`, or, when it
  has none, the parameters of config.init.checkpoint (zero-shot, as step 0).

  The data and the eval split are checked before any parameter is read.
  """
  from omnismola.data import pipeline  # TensorFlow only from here on.

  workdir = storage.path(workdir)
  # The model is the workdir's when it has a checkpoint, else init's.
  check_model_inputs(config, pipeline, init_lib.find_step_dir(workdir))
  pipeline.prepare(config.data)
  # No optimizer state unless a training state is restored: nothing is
  # trained here.
  built = setup(config, optax.identity())
  run_eval = _make_eval_runner(config, workdir, built, pipeline)
  latest, ckpt = _latest_checkpoint(config, workdir)
  if latest is None:
    log_lib.print_line(f"No checkpoint in {workdir}: evaluating "
                       f"config.init.checkpoint={config.init.checkpoint} "
                       "as it is (zero-shot, step 0).")
    state = init_lib.load_partial(
        config.init.checkpoint, built.init_fn(jax.random.key(config.seed)),
        built.abstract, upcycle=config.init.upcycle,
        upcycle_noise_std=config.init.upcycle_noise_std, seed=config.seed)
    return run_eval(0, state)
  if config.init.checkpoint:
    log_lib.print_line(f"Evaluating the workdir's checkpoint of step {latest}"
                       "; it takes precedence over config.init.checkpoint="
                       f"{config.init.checkpoint}.")
  _, abstract, _ = create_state(config, built.mesh,
                                optim.make_optimizer(config.train))
  # The newest checkpoint every process reads, as training resumes from.
  restored = ckpt.restore_latest(abstract)
  ckpt.close()
  return run_eval(restored.step, restored.state)


def _latest_checkpoint(config, workdir: str):
  """(latest step, Checkpointer) of <workdir>/checkpoints, or (None, None)
  when it has none and config.init.checkpoint names a checkpoint to use
  instead; anything else is an InputError."""
  directory = workdir / "checkpoints"
  if directory.is_dir():  # A Checkpointer would create it.
    ckpt = checkpoint_lib.Checkpointer(directory,
                                       keep=config.train.keep_checkpoints,
                                       read_only=True)
    latest = ckpt.latest_step()
    if latest is not None:
      return latest, ckpt
    ckpt.close()
  if not config.init.checkpoint:
    raise errors.InputError(
        f"No checkpoint in {directory} to evaluate: train first with "
        "--mode=train, or evaluate a pretrained model's parameters with "
        "--config.init.checkpoint=DIR (e.g. python -m omnismola.convert's "
        "output).")
  try:
    init_lib.resolve_step_dir(config.init.checkpoint)
  except FileNotFoundError as e:
    raise errors.InputError(str(e)) from None
  return None, None


def _make_eval_runner(config, workdir, built: Setup, pipeline):
  """run_eval(step, state): evaluates every task of config.eval.split,
  writes the metrics and predictions, prints a table.

  Every host decodes its shard of each task; the evaluator gathers the
  predictions. The data must already be prepared (`pipeline.prepare`); the
  eval tasks and their split are checked here, before any training.
  """
  vocabulary = pipeline.get_vocabulary(config.data)
  # config.eval.batch_size is global, as train.batch_size is; hosts whose
  # devices hold the same rows decode the same shard (host_shards.py).
  shard = host_shards.host_shard(built.mesh, built.rules,
                                 config.eval.batch_size)
  decode_fn = make_decode_fn(built.parts, built.mesh, built.rules, shard,
                             config.eval.max_new_tokens, vocabulary.eos_id)
  detokenize = functools.partial(pipeline.detokenize, vocabulary=vocabulary)
  split = config.eval.get("split", "validation")
  make_eval_sets = functools.partial(
      pipeline.make_eval_sets, config.data,
      batch_size=config.eval.batch_size // shard.count, split=split,
      tasks=list(config.eval.tasks) or None,
      max_examples=config.eval.max_examples or None,
      process_index=shard.index, process_count=shard.count)
  make_eval_sets()  # Reads nothing; fails now on an unknown task or split.

  def run_eval(step: int, state: TrainState) -> dict:
    results, predictions = evaluator.evaluate(
        functools.partial(decode_fn, state), make_eval_sets(),
        detokenize=detokenize)
    path = evaluator.write_results(workdir, step, results, split)
    evaluator.write_predictions(workdir, step, predictions, split)
    chance = pipeline.chance_levels(config.data)
    log_lib.print_line(
        f"\nEvaluation of the {split} split at step {step} ({path}, and "
        "each task's predictions beside it):\n" +
        evaluator.format_table(results, chance))
    return results

  return run_eval


def step_flops(config) -> tuple[flops_lib.Count, flops_lib.Count]:
  """FLOPs of one train step of `config` (config.train.batch_size rows) and
  of the forward pass on that batch, counted from the traced programs
  (flops.py); nothing is compiled or run."""
  abstract_model = nnx.eval_shape(lambda: build.build_model(config))
  graphdef, params_t, frozen_t = split_model(abstract_model,
                                             config.train.trainable)
  parts = ModelParts(graphdef, params_t, frozen_t)
  params, frozen = nnx.to_pure_dict(params_t), nnx.to_pure_dict(frozen_t)
  optimizer = optim.make_optimizer(config.train)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     frozen=frozen,
                     opt_state=jax.eval_shape(optimizer.init, params))
  shapes = row_layout.batch_shapes(row_layout.row_layout(config.data),
                                   int(config.train.batch_size),
                                   int(config.model.vit.image_size))
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
           for key, (shape, dtype) in shapes.items()}
  train_step = make_train_step(
      parts, optimizer, optim.learning_rate_schedule(config.train),
      num_tasks=1, compute_dtype=jnp.dtype(config.train.compute_dtype),
      microbatches=int(config.train.microbatches),
      aux_loss_weights=dict(config.train.aux_loss_weights))
  forward = lambda params, frozen, batch: parts.merge(params, frozen).forward(
      batch["image"], batch["text"], batch["mask_ar"], batch["mask_input"],
      batch.get("segment_ids"))
  return (flops_lib.count(train_step, state, batch),
          flops_lib.count(forward, params, frozen, batch))


def row_cost(config) -> tuple[int, float]:
  """(tokens, required training FLOPs) of one train row, for throughput and
  MFU. Tokens are the image tokens plus the text length (padding included:
  the model computes on it), for every image slot of a packed row."""
  model = build.vlm_config(config.model)
  layout = row_layout.row_layout(config.data)
  train, _ = step_flops(config)
  return (layout.images * model.num_image_tokens + layout.text_length,
          train.required / int(config.train.batch_size))


def _log_parameter_counts(abstract: TrainState, replicated: float) -> None:
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  trained, frozen = count(abstract.params), count(abstract.frozen)
  log_lib.print_line(f"Parameters: {trained + frozen:,} "
                     f"({trained:,} trained, {frozen:,} frozen; "
                     f"{replicated:.1%} of the bytes whole on every device).")
