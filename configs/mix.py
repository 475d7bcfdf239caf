r"""Omni-SMoLA generalist: a VLM backbone plus soft mixtures of low-rank experts.

Every linear layer of the decoder (attention q/k/v/o, MLP gate/up/down) gets
three SMoLA pools: experts for text tokens, for image tokens and for all
tokens, added residually to the backbone (docs/experts.md). The model is
trained on a SeqIO mixture and evaluated on every task of it.

Default (no arg): the `small` preset trained from scratch on the built-in
synthetic suite; runs on a 2-core CPU in a few minutes:

  python -m omnismola.main --config=configs/mix.py --workdir=/tmp/mix

Arguments (comma-separated key=value after a colon):
  preset=NAME          a model preset (default small)
  experts_per_pool=N   experts in each of the text/image/all pools (default 4)
  rank=R               rank of every expert (default 4)
  frozen_backbone=BOOL train only the experts (use with init.checkpoint)

  python -m omnismola.main --config=configs/mix.py:experts_per_pool=16 \
      --workdir=/tmp/mix16
"""
import ml_collections

from omnismola import build
from omnismola import config_lib
from omnismola.train import partitioning

# Every linear layer of the decoder blocks.
DECODER_LINEARS = r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, preset="small", experts_per_pool=4, rank=4,
                              frozen_backbone=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = build.model_config_to_dict(args.preset)
  pools = dict(text=args.experts_per_pool, image=args.experts_per_pool,
               all=args.experts_per_pool)
  c.experts = [dict(kind="smola", targets=DECODER_LINEARS, pools=pools,
                    rank=args.rank, slots_per_expert=1)]

  # Axis sizes within a slice (-1: the rest); `dcn` sizes them across slices
  # (multi-slice), e.g. --config.mesh.dcn.data=2: see docs/training.md.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1,
                dcn=dict(data=1, fsdp=1, tensor=1, expert=1))
  c.sharding_rules = [list(rule) for rule in partitioning.DEFAULT_RULES]

  c.data = dict(
      mixture="synthetic_mix",
      task_modules=(),
      feature_lengths=dict(prefix=48, suffix=32),
      # Examples longer than feature_lengths: "truncate" (cut, counted as
      # data/<task>/truncated), "drop" (skipped, data/<task>/dropped) or
      # "error". See docs/data.md.
      truncation="truncate",
      # Several examples per row, each with its own image: examples=M > 1
      # turns it on; text_length=0 means prefix + suffix. See docs/data.md.
      packing=dict(examples=0, text_length=0, window=64),
      tfds_data_dir="~/tensorflow_datasets",
      # Real datasets' files: <manual_dir>/<builder>/ ('' = under
      # tfds_data_dir/downloads/manual). See docs/data.md.
      manual_dir="",
      # "byte", or the path of a SentencePiece model (Gemma's for PaliGemma).
      vocabulary="byte",
      shuffle_buffer=10_000,
      # Your data as JSON-lines files, <dir>/<split>.jsonl: a task named
      # `name` scored with `metric`; put the name in `mixture`. See
      # docs/data.md.
      jsonl=dict(name="", dir="", metric="exact_match"),
  )
  # Images are resized to what the ViT takes; overriding
  # --config.model.vit.image_size moves both.
  c.data.image_size = c.model.vit.get_ref("image_size")

  c.train = dict(
      steps=1000,
      batch_size=32,
      lr=1e-3,
      warmup_steps=100,
      schedule="cosine",
      weight_decay=1e-4,
      grad_clip_norm=1.0,
      # Regex over parameter paths; everything else is frozen (no optimizer
      # state). From scratch everything must learn; from a pretrained
      # backbone, train the adapters only.
      trainable=r".*/adapters/.*" if args.frozen_backbone else r".*",
      # (regex, multiplier) pairs over trained parameter paths; the first
      # match scales that parameter's learning rate, e.g.
      # [(r".*/router/.*", 0.1)].
      lr_multipliers=(),
      # Forward/backward dtype; master weights and optimizer state are
      # float32 whatever this is ('bfloat16' on accelerators).
      compute_dtype="float32",
      microbatches=1,          # Gradient accumulation steps per batch.
      max_nonfinite_steps=20,  # Consecutive skipped steps before stopping.
      # Largest share of parameter bytes that every device may hold whole
      # (mesh > 1 device); above it the run stops, naming the parameters.
      # 1.0 = off: the default mesh is pure data parallelism.
      max_replicated_fraction=1.0,
      # Weights of the routers' auxiliary losses (sparse experts; SMoLA has
      # none): each averaged over a stack's layers, summed over blocks.
      aux_loss_weights=dict(balance_loss=0.01, z_loss=0.001),
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=3,
      # Resuming with another schedule (e.g. more steps) starts a new one,
      # warm-up and decay, at the resumed step; without it the run stops
      # (docs/training.md, "Resume").
      extend=False,
      # The step the schedule starts at: 0, or where `extend` started one
      # (taken from the checkpoint when resuming).
      schedule_start=0,
  )

  c.eval = dict(
      # Steps between evaluations during training (0 = off): the default
      # run shows its first scores at step 300, minutes in.
      every=300,
      at_end=True,       # Evaluate after the last step.
      tasks=(),          # Task names; empty = every task of the mixture.
      split="validation",  # The split to score ("test", "train", ...).
      batch_size=64,     # Global, as train.batch_size.
      max_examples=256,  # Per task; 0 = the whole split.
      max_new_tokens=32,
  )

  # Traces steps first_step .. first_step + steps - 1 to <workdir>/profile
  # for TensorBoard's profile plugin; steps=0: no trace.
  c.profile = dict(first_step=10, steps=0)

  c.init = dict(
      checkpoint="",  # A workdir or converted checkpoint to start from.
      # Experts whose dense MLP (or LoRA) the checkpoint has start as copies
      # of it; False: they keep their fresh initialisation (the
      # from-scratch baseline of upcycling), the rest still loads.
      upcycle=True,
      # Noise on experts upcycled from the checkpoint's dense MLPs.
      upcycle_noise_std=0.0,
  )
  return c.lock()
