"""The papers' configs: each stage builds and trains; stages chain."""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from omnismola import config_lib
from omnismola.train import trainer


def _tiny(spec: str, data_dir, steps: int = 2):
  """A config file's variant shrunk to the tiny preset and a few steps."""
  c = config_lib.load_config_file(spec)
  c.model.vit.image_size, c.model.vit.patch_size = 64, 16  # The data's size.
  c.data.tfds_data_dir = str(data_dir)
  c.data.shuffle_buffer = 64
  c.train.update(dict(steps=steps, batch_size=8, log_every=1,
                      checkpoint_every=steps, warmup_steps=0))
  c.eval.at_end = False
  return c


def test_cumo_stages_chain_and_upcycle(synthetic_data_dir, tmp_path):
  """pt trains the connector only; pft everything; vit upcycles the dense
  ViT and connector MLPs of pft into top-2-of-4 experts."""
  runs = {}
  previous = ""
  for stage in ("pt", "pft", "vit"):
    c = _tiny(f"configs/cumo.py:stage={stage},preset=tiny", synthetic_data_dir)
    c.init.checkpoint = previous
    runs[stage] = previous = str(tmp_path / stage)
    trainer.train_and_evaluate(c, previous)

  state = lambda stage: ocp.StandardCheckpointer().restore(
      f"{runs[stage]}/checkpoints/2/state")
  pt, pft, vit = state("pt"), state("pft"), state("vit")
  assert set(pt["params"]) == {"connector"}  # Stage 1: the connector only.
  assert {"vit", "connector", "decoder"} <= set(pft["params"])
  moe = vit["params"]["connector"]["mlp"]
  assert moe["router"].shape[-1] == 4
  # Upcycled, then trained 2 steps: every expert started as pft's fc1, so
  # the experts still agree closely with it and with each other.
  dense = np.asarray(pft["params"]["connector"]["mlp"]["fc1"]["kernel"])
  experts = np.asarray(moe["layers"]["fc1"]["kernel"])
  assert experts.shape == (4,) + dense.shape
  np.testing.assert_allclose(experts, np.broadcast_to(dense, experts.shape),
                             atol=0.05)
  with open(f"{runs['vit']}/train_metrics.jsonl") as f:
    row = json.loads(f.readlines()[-1])
  assert row["moe/vit/layers/mlp/balance_loss"] >= 1.0 - 1e-5
  assert "moe/connector/mlp/router_entropy" in row


def test_cumo_rejects_an_unknown_stage():
  with pytest.raises(ValueError, match="unknown stage"):
    config_lib.load_config_file("configs/cumo.py:stage=sft")
