r"""CuMo: co-upcycled top-2-of-4 MoE in the vision encoder and the connector.

CuMo (Li et al., NeurIPS 2024) keeps the language model dense and puts a
sparse MoE (4 experts, top-2, renormalised gates, no token dropping) in
every MLP of the vision encoder and in the 2-layer MLP connector. The
experts are co-upcycled: copies of the dense MLPs trained by the first two
stages; the routers start fresh. Auxiliary losses: balance 0.1, z 0.01.

Three stages, one command each; a stage starts from the previous stage's
workdir (`init.checkpoint`), and the MoE stage upcycles the dense MLPs it
finds there (omnismola/train/init.py):

  python -m omnismola.main --config=configs/cumo.py:stage=pt  --workdir=/tmp/cumo/pt
  python -m omnismola.main --config=configs/cumo.py:stage=pft --workdir=/tmp/cumo/pft \
      --config.init.checkpoint=/tmp/cumo/pt
  python -m omnismola.main --config=configs/cumo.py:stage=vit --workdir=/tmp/cumo/vit \
      --config.init.checkpoint=/tmp/cumo/pft

| stage | trains | paper lr | here |
|---|---|---|---|
| pt (pre-training) | the MLP connector only | 1e-3 | 1e-3 |
| pft (pre-finetuning) | everything, dense | 2e-6 | 1e-3 |
| vit (visual instruction tuning) | everything + upcycled MoE | 2e-6 / 4e-6 | 5e-4 |

The paper's learning rates fine-tune a pretrained 7B model; the defaults
here train the `small` preset on the built-in synthetic suite from scratch
in minutes on a CPU, which needs larger ones. Known differences from
CuMo's code: our balance loss counts all k choices (CuMo counts the top-1
choice only), and the backbone is a SigLIP-style ViT + Gemma-style decoder
rather than CLIP + Mistral.

Ablation, upcycled vs scratch experts: `--config.init.upcycle=False` in
stage vit starts the experts fresh (the routers always are) while
everything else still loads from the pft workdir.

Default (no arg): stage=pt.
"""
from omnismola import config_lib

# Every MLP block of the vision encoder, and the MLP connector.
VISION_MLPS = r"vit/layers/\d+/mlp"
CONNECTOR_MLP = r"connector/mlp"

STAGES = {
    # stage: (trainable regex, lr, MoE blocks present)
    "pt": (r"connector/.*", 1e-3, False),
    "pft": (r".*", 1e-3, False),
    "vit": (r".*", 5e-4, True),
}


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, stage="pt", preset="small", experts=4,
                              top_k=2)
  config_lib.check_stage(__file__, args.stage, STAGES)
  trainable, lr, moe = STAGES[args.stage]
  c = config_lib.load_sibling_config(__file__, "mix.py",
                                     f"preset={args.preset}")
  c.model.connector = "mlp"
  moe_options = dict(kind="sparse_moe", num_experts=args.experts,
                     top_k=args.top_k, renormalize=True, dispatch="dropless")
  c.experts = ([dict(moe_options, targets=VISION_MLPS),
                dict(moe_options, targets=CONNECTOR_MLP)] if moe else [])
  c.train.trainable = trainable
  c.train.lr = lr
  c.train.steps = 300
  c.train.aux_loss_weights = dict(balance_loss=0.1, z_loss=0.01)
  return c.lock()
