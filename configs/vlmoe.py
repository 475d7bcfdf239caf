r"""VL-MoE: modality-split sparse MoE in the lower layers, dense MLPs on top.

VL-MoE (Shen et al., EMNLP Findings 2023) scales a multiway Transformer
with sparse experts: in the lower layers, image tokens go to top-k of the
vision experts (V-MoE) and text tokens to top-k of the text experts
(T-MoE); the top layers keep one dense FFN shared by both modalities
(VL-FFN, not scaled: modality-agnostic MoE was unstable, as in LIMoE). The
vision MoE uses Batch Priority Routing. On our backbone (SigLIP-style ViT,
Gemma-style prefix-LM decoder) that is:

* decoder, lower layers: a `sparse_moe` with pools `dict(image=E,
  text=E)`: image tokens route among the image experts, text tokens among
  the text experts. Dropless dispatch: with capacity dispatch a sequence's
  tokens compete for expert slots, so a later suffix token could decide
  whether an earlier one is dropped, which breaks causality and cached
  decoding (the decoder refuses `dispatch='capacity'`, docs/experts.md);
* decoder, upper layers: the dense GeGLU MLP, shared by image and text;
* ViT, lower layers: a `sparse_moe` of E image experts with capacity
  dispatch and batch-priority routing (V-MoE's BPR: slots are filled by
  descending top gate). Legal there: every ViT token is bidirectional;
* ViT, upper layers: the dense MLP.

A tower whose experts cover only some layers is split into two scanned
stacks (`decoder/layers_0_2/...`, `decoder/layers_2_3/...`;
models/stack.py); a dense checkpoint (`decoder/layers/...`, e.g. a converted
PaliGemma) still initialises it through `--config.init.checkpoint`, the MoE
experts upcycled from its MLPs (omnismola/train/init.py).

What VL-MoE's available text leaves unknown, and what we chose:

| unknown | our choice | argument |
|---|---|---|
| top-k | 2 (V-MoE's usual k) | `top_k=` |
| experts | 4 per modality pool (VL-MoE Base has 32) | `experts=` |
| which layers are MoE | the lower half of each tower, rounded up | `moe_layers=` (fraction) |
| capacity factor (ViT) | 1.25 per sequence | `--config.experts[0].capacity_factor` |
| auxiliary losses | Switch balance loss 0.01, ST-MoE z-loss 0.001 | `train.aux_loss_weights` |
| expert initialisation | fresh (from scratch); upcycled with `init.checkpoint` | |

Commands:

  python -m omnismola.main --config=configs/vlmoe.py --workdir=/tmp/vlmoe
  python -m omnismola.main --config=configs/vlmoe.py:experts=8,top_k=1 \
      --workdir=/tmp/vlmoe8 '--config.experts[0].capacity_factor=2'
  python -m omnismola.main \
      --config=configs/vlmoe.py:preset=paligemma_3b_224,moe_layers=0.25 \
      --config.init.checkpoint=/ckpt/omni-pg3b \
      --config.data.vocabulary=/ckpt/paligemma_tokenizer.model \
      --workdir=/tmp/vlmoe-pg

`config.experts` is a list: an override indexes it as ml_collections does,
`--config.experts[0].capacity_factor=2` (the ViT entry; quoted in a shell,
where `[0]` is a glob).

Arguments (comma-separated key=value after a colon):
  preset=NAME     a model preset (default small: trains from scratch on the
                  synthetic suite on a CPU in minutes)
  depth=N         layers of both towers (default 0: the preset's)
  experts=E       experts per pool: ViT image experts, decoder image and
                  text experts (default 4)
  top_k=K         experts per token (default 2)
  moe_layers=F    fraction of each tower's layers, from the bottom, that are
                  MoE (default 0.5; at least one layer)
  moe=M           which modalities get experts, VL-MoE's ablation (default
                  both): `both` (ViT MoE, decoder image and text pools),
                  `text` (decoder text pool only; image tokens keep the
                  dense MLP, `dense_fallback`, docs/experts.md; dense ViT),
                  `image` (ViT MoE and the decoder image pool; text tokens
                  keep the dense MLP) or `none` (dense, no experts). With
                  `text`, `config.experts[0]` is the decoder's entry.

The layer split is computed from the depth here: change depth with
`depth=`, not `--config.model.decoder.depth`, or the targets stay put.
"""
import math

from omnismola import config_lib


def lower_layers(tower: str, depth: int, fraction: float) -> str:
  """Regex over the MLP blocks of the lowest ceil(fraction * depth) layers
  (at least one) of `tower`, e.g. `decoder/layers/(0|1)/mlp`."""
  if not 0 < fraction <= 1:
    raise ValueError(f"configs/vlmoe.py: moe_layers={fraction} must be a "
                     "fraction of the layers in (0, 1].")
  count = max(1, math.ceil(fraction * depth))
  return rf"{tower}/layers/({'|'.join(map(str, range(count)))})/mlp"


# moe= -> the modalities that get experts.
MOE_MODALITIES = {"both": ("image", "text"), "text": ("text",),
                  "image": ("image",), "none": ()}


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, preset="small", depth=0, experts=4,
                              top_k=2, moe_layers=0.5, moe="both")
  if args.moe not in MOE_MODALITIES:
    raise ValueError(f"configs/vlmoe.py: moe={args.moe!r}; expected one of "
                     f"{sorted(MOE_MODALITIES)}.")
  modalities = MOE_MODALITIES[args.moe]
  c = config_lib.load_sibling_config(__file__, "mix.py",
                                     f"preset={args.preset}")
  if args.depth:
    c.model.vit.depth = c.model.decoder.depth = args.depth
  moe = dict(kind="sparse_moe", top_k=args.top_k, renormalize=True)
  vit = dict(moe, targets=lower_layers("vit", c.model.vit.depth,
                                       args.moe_layers),
             num_experts=args.experts, dispatch="capacity",
             capacity_factor=1.25, batch_priority=True)
  decoder = dict(moe, targets=lower_layers("decoder", c.model.decoder.depth,
                                           args.moe_layers),
                 pools={m: args.experts for m in modalities},
                 dispatch="dropless")
  if len(modalities) == 1:
    # The other modality's tokens keep the dense FFN rather than none.
    decoder["dense_fallback"] = True
  c.experts = (([vit] if "image" in modalities else []) +
               ([decoder] if modalities else []))
  c.train.steps = 300
  c.train.aux_loss_weights = dict(balance_loss=0.01, z_loss=0.001)
  return c.lock()
