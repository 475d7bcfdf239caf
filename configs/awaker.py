r"""Awaker2.5-VL: routed LoRA experts on the decoder, in three stages.

Awaker2.5-VL (Long, Dai et al., 2024) keeps Qwen2-VL frozen and adapts its
language model: a plain LoRA on attention q/k/v, and on attention o and the
MLP's gate/up/down a mixture of 4 LoRA experts plus an always-on global
LoRA, routed top-1 per example from the prompt's embedding (image tokens +
question; `TokenInfo.instance`), the global expert weighted 1 - (the top
gate). o has its own gate; up and down reuse gate's routing. Three stages,
one command each; each stage starts from the previous one's workdir
(`init.checkpoint`):

  python -m omnismola.main --config=configs/awaker.py:stage=lora --workdir=/tmp/awaker/lora
  python -m omnismola.main --config=configs/awaker.py:stage=moe --workdir=/tmp/awaker/moe \
      --config.init.checkpoint=/tmp/awaker/lora
  python -m omnismola.main --config=configs/awaker.py:stage=frozen_gates \
      --workdir=/tmp/awaker/frozen_gates --config.init.checkpoint=/tmp/awaker/moe

| stage | experts on o, gate, up, down | trains | paper lr | here |
|---|---|---|---|---|
| lora (I) | one LoRA | everything | 1e-5 | 1e-3 |
| moe (II) | `sparse_lora`, every expert a copy of stage I's LoRA | everything | 1e-5 | 1e-3 |
| frozen_gates (III) | the same | everything but the routers | 5e-6 | 5e-4 |

Stage II upcycles by itself: the `lora_1` of the stage-I checkpoint sits at
the layers where stage II has `sparse_lora_1`, so `train/init.py` copies
it into every expert and the global expert; the routers start fresh. With
top-1 gates and the global expert (g + (1 - g) = 1), stage II starts
with stage I's logits on every real token.

Paper vs here: the paper trains LoRAs of rank 256, alpha 512 (scale 2) on
a frozen 7B model with lr 1e-5 / 1e-5 / 5e-6, batch 4, on 12M samples.
The default here trains the `small` preset from scratch on the built-in
synthetic suite in minutes on a CPU: everything trains, rank 8 with alpha
16 (the paper's scale 2), larger learning rates in the paper's 2:2:1
ratio, 300 steps a stage. With a pretrained backbone
(`--config.init.checkpoint` of a converted model in stage I),
`:frozen_backbone=True` trains the adapters only, as the paper does (and
in stage III the adapters but not their routers). Not implemented: the
routers' training noise (std 0.1 in Awaker's code; forward passes take no
rng) and LoRA dropout 0.05.

Arguments (comma-separated key=value after a colon): stage (lora), preset
(small), experts (4), rank (8), frozen_backbone (False), global_expert
(True; False drops the always-on global LoRA, to ablate it).

Without the global expert the routed LoRA's output is g · E(x), g the top-1
softmax probability, which is not renormalised (Awaker's gating): at least
1/experts, near it for a fresh router. So stage II no longer starts with
stage I's logits but with its LoRAs on o/gate/up/down scaled down by g.
"""
from omnismola import config_lib

QKV = r"decoder/layers/\d+/attn/(q|k|v)"
# One entry: `share_gate` shares a router among the layers it matches inside
# one block, so o (alone in attn) has its own and gate/up/down share one.
MOE_LINEARS = r"decoder/layers/\d+/(attn/o|mlp/(gate|up|down))"
# Every parameter path except the routers' (stage III's frozen gates).
NOT_ROUTERS = r"(?!.*/router/)"

STAGES = {
    # stage: (MoE on MOE_LINEARS, routers train, lr)
    "lora": (False, True, 1e-3),
    "moe": (True, True, 1e-3),
    "frozen_gates": (True, False, 5e-4),
}


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, stage="lora", preset="small", experts=4,
                              rank=8, frozen_backbone=False,
                              global_expert=True)
  config_lib.check_stage(__file__, args.stage, STAGES)
  moe, routers_train, lr = STAGES[args.stage]
  c = config_lib.load_sibling_config(__file__, "mix.py",
                                     f"preset={args.preset}")
  low_rank = dict(rank=args.rank, alpha=2.0 * args.rank)
  c.experts = [
      dict(kind="lora", targets=QKV, **low_rank),
      dict(kind="sparse_lora", targets=MOE_LINEARS,
           num_experts=args.experts, top_k=1, routing="instance",
           global_expert=args.global_expert, share_gate=True, **low_rank)
      if moe else
      dict(kind="lora", targets=MOE_LINEARS, **low_rank),
  ]
  trained = r".*/adapters/.*" if args.frozen_backbone else r".*"
  c.train.trainable = trained if routers_train else NOT_ROUTERS + trained
  c.train.lr = lr
  c.train.steps = 300
  return c.lock()
