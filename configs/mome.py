r"""MoME: a mixture of vision encoders (MoVE) and of language experts (MoLE).

MoME (Shen et al., NeurIPS 2024) feeds one image to several vision
encoders, turns each one's features into L tokens with an adaptive
transformation (ADT: adaptive average pooling, then layers of
self-attention, cross-attention to the full feature map and an MLP) and
mixes them with an instance-level soft router over an embedding of the
instruction (`model.connector='move'`, docs/models.md). Beside every FFN of
the language model sits a mixture of adapters (`s · up(relu(down(x)))`,
bottleneck 64, learned scale s), one chosen per example (top-1, instance
routing): a `sparse_lora` entry on the decoder's MLP blocks.

Encoders here: the preset's ViT plus a second, narrower one with half the
patch size (a finer grid of the same image), standing in for MoME's EVA
CLIP / DINOv2 / Pix2Struct trio. More encoders: append to
`model.extra_vits`.

Two stages, one command each; the second starts from the first's workdir
(`init.checkpoint`) and copies the trained adapter into every expert
(omnismola/train/init.py), the router starting fresh:

  python -m omnismola.main --config=configs/mome.py:stage=single \
      --workdir=/tmp/mome/single
  python -m omnismola.main --config=configs/mome.py:stage=mole \
      --workdir=/tmp/mome/mole --config.init.checkpoint=/tmp/mome/single

| stage | adapters beside every decoder MLP | paper | here |
|---|---|---|---|
| single | one (a 1-expert `sparse_lora`) | 30k steps | 300 steps |
| mole | `experts`, top-1 per example | not given | 300 steps |

Both stages train everything from scratch with AdamW, linear warm-up to
the paper's 5e-4 then cosine decay; weight decay 0.05 as in the paper. The
paper fine-tunes pretrained encoders and Vicuna-7B (which weights it
freezes is not stated); the defaults here train the `small` preset on the
built-in synthetic suite on a CPU in minutes.

Arguments (comma-separated key=value after a colon): stage (single|mole),
preset (small), experts (K = 4, MoME's Fig. 2), rank (adapter bottleneck,
64), adt_depth (ADT layers M, 1; MoME: 6), num_tokens (L, 0 = the primary
encoder's patch count), encoders (2; 1 = the preset's ViT alone through
its plain connector, no MoVE), mixer (router: MoVE's soft router; add:
the branches summed, no router, MoME's "add" baseline; two encoders only).

MoVE ablation, one encoder vs two added vs two routed:

  python -m omnismola.main --config=configs/mome.py:encoders=1 --workdir=/tmp/mome/one
  python -m omnismola.main --config=configs/mome.py:mixer=add --workdir=/tmp/mome/add
  python -m omnismola.main --config=configs/mome.py --workdir=/tmp/mome/router

Default (no arg): stage=single.
"""
import dataclasses

from omnismola import config_lib
from omnismola.models.connectors import MOVE_MIXERS
from omnismola.models.vit import ViTConfig

# The FFN of every decoder layer: MoLE's adapters sit beside these blocks.
DECODER_MLPS = r"decoder/layers/\d+/mlp"

# stage -> number of adapters beside each decoder MLP (None: args.experts).
STAGES = {"single": 1, "mole": None}


def second_encoder(primary: ViTConfig) -> ViTConfig:
  """The stand-in second encoder: half the primary's patch size (4x the
  tokens), width, heads and MLP width; same input size and depth."""
  half = lambda n: max(1, n // 2)
  return dataclasses.replace(primary, patch_size=half(primary.patch_size),
                             width=half(primary.width),
                             num_heads=half(primary.num_heads),
                             mlp_dim=half(primary.mlp_dim))


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, stage="single", preset="small", experts=4,
                              rank=64, adt_depth=1, num_tokens=0, encoders=2,
                              mixer="router")
  config_lib.check_stage(__file__, args.stage, STAGES)
  if args.encoders not in (1, 2):
    raise ValueError(f"configs/mome.py: encoders={args.encoders}; expected 1 "
                     "(the preset's ViT alone) or 2 (plus the stand-in "
                     "second encoder).")
  if args.mixer not in MOVE_MIXERS or (args.encoders == 1 and
                                       args.mixer != "router"):
    raise ValueError(f"configs/mome.py: mixer={args.mixer!r}; expected one "
                     f"of {MOVE_MIXERS}, with encoders=2 (one encoder has "
                     "nothing to mix).")
  c = config_lib.load_sibling_config(__file__, "mix.py",
                                     f"preset={args.preset}")
  if args.encoders == 2:
    primary = ViTConfig(**c.model.vit)
    c.model.connector = "move"
    c.model.extra_vits = (dataclasses.asdict(second_encoder(primary)),)
    c.model.move.num_tokens = args.num_tokens
    c.model.move.adt_depth = args.adt_depth
    c.model.move.mixer = args.mixer
  c.experts = [dict(kind="sparse_lora", targets=DECODER_MLPS,
                    num_experts=STAGES[args.stage] or args.experts,
                    rank=args.rank, top_k=1, routing="instance",
                    global_expert=False, share_gate=False, activation="relu",
                    learned_scale=True, alpha=None)]
  c.train.trainable = r".*"
  c.train.lr = 5e-4
  c.train.schedule = "cosine"
  c.train.warmup_steps = 30
  c.train.weight_decay = 0.05
  c.train.steps = 300
  return c.lock()
