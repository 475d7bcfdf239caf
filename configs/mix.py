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

from omnismola import config_lib
from omnismola import schema

# Every linear layer of the decoder blocks.
DECODER_LINEARS = r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, preset="small", experts_per_pool=4, rank=4,
                              frozen_backbone=False)
  # Every field at its default (omnismola/schema.py); the SMoLA experts.
  c = schema.base_config(args.preset)
  pools = dict(text=args.experts_per_pool, image=args.experts_per_pool,
               all=args.experts_per_pool)
  c.experts = [dict(kind="smola", targets=DECODER_LINEARS, pools=pools,
                    rank=args.rank, slots_per_expert=1)]
  # From scratch everything must learn; from a pretrained backbone, train
  # the adapters only.
  if args.frozen_backbone:
    c.train.trainable = r".*/adapters/.*"
  return c.lock()
