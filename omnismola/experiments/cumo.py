r"""CuMo's ablation at small scale: sparse MoE blocks upcycled from a dense
model against MoE blocks trained from scratch, with and without the
auxiliary losses.

  python -m omnismola.experiments.cumo --workdir=/tmp/study_cumo

A dense model (configs/cumo.py stage=pft: everything trains, no MoE;
CuMo's pre-training and pre-finetuning stages in one) trains from scratch;
every arm then starts from it with the same steps:

| arm | from the dense model |
|---|---|
| dense | trains on, still dense |
| upcycled | stage=vit: top-2-of-4 MoE in the ViT's MLPs and the connector, experts copied from the dense MLPs; balance 0.1, z 0.01 |
| scratch | the same MoE, experts freshly initialised (`init.upcycle=False`) |
| upcycled_no_aux, scratch_no_aux | the same without the auxiliary losses |

Scale: the `small` preset, batch 32; the dense model trains 600 steps,
every arm 300 more at stage vit's learning rate (5e-4); one seed by
default (--seeds=N runs N of each arm).
"""

from omnismola.experiments import study

FULL = study.Scale()
# The dense model trains this many times an arm's steps.
DENSE_STEPS_FACTOR = 2
LR = 5e-4  # configs/cumo.py's stage vit.

# arm: (configs/cumo.py stage, upcycle, auxiliary losses)
ARMS = {
    "dense": ("pft", True, True),
    "upcycled": ("vit", True, True),
    "scratch": ("vit", False, True),
    "upcycled_no_aux": ("vit", True, False),
    "scratch_no_aux": ("vit", False, False),
}


def runs(settings: study.Settings) -> list[study.Run]:
  scale = study.QUICK if settings.quick else FULL
  dense = study.configure(
      study.load_config("cumo.py", f"preset={scale.preset},stage=pft"),
      scale, settings, steps=DENSE_STEPS_FACTOR * scale.steps)
  out = [study.Run("dense_start", "dense_start", 0, dense)]
  for seed in range(settings.seeds):
    for arm, (stage, upcycle, aux) in ARMS.items():
      c = study.configure(
          study.load_config("cumo.py", f"preset={scale.preset},stage={stage}"),
          scale, settings, seed=seed, lr=LR)
      c.init.upcycle = upcycle
      if not aux:
        c.train.aux_loss_weights = dict(balance_loss=0.0, z_loss=0.0)
      out.append(study.Run(f"{arm}/seed{seed}", arm, seed, c,
                           starts_from="dense_start"))
  return out


TABLES = [
    study.Table("upcycling", "Upcycled vs from-scratch MoE, from one dense "
                "model", ("dense_start", "dense", "upcycled", "scratch")),
    study.Table("aux_losses", "Without the balance and z losses",
                ("upcycled", "upcycled_no_aux", "scratch", "scratch_no_aux")),
]


if __name__ == "__main__":
  study.run_command(runs, TABLES,
                    "CuMo: co-upcycled MoE blocks vs MoE from scratch", 1)
