r"""VL-MoE's ablation at small scale: which modality gains from sparse
experts at equal activated compute, and how the gain grows with experts.

  python -m omnismola.experiments.vlmoe --workdir=/tmp/study_vlmoe

Every arm is configs/vlmoe.py trained from scratch on the synthetic suite
with the same steps and batch, top-1 routing so that a token's MLP work
equals the dense model's (the FLOP columns show it):

| arm | configs/vlmoe.py argument |
|---|---|
| dense | moe=none |
| text_moe | moe=text: text tokens routed among text experts, image tokens dense |
| image_moe | moe=image: the ViT's MoE and the decoder's image pool |
| both_moe | moe=both (VL-MoE), 4 experts per pool |
| both_moe_8, both_moe_16 | moe=both with 8 / 16 experts per pool |

Scale: the `small` preset, 300 steps of batch 32 per arm; one seed by
default (--seeds=N runs N).
"""

from omnismola.experiments import study

FULL = study.Scale()
ARMS = {
    "dense": "moe=none",
    "text_moe": "moe=text",
    "image_moe": "moe=image",
    "both_moe": "moe=both",
    "both_moe_8": "moe=both,experts=8",
    "both_moe_16": "moe=both,experts=16",
}


def runs(settings: study.Settings) -> list[study.Run]:
  """One run from scratch per arm and seed."""
  scale = study.QUICK if settings.quick else FULL
  return [study.Run(f"{arm}/seed{seed}", arm, seed, study.configure(
              study.load_config("vlmoe.py",
                                f"preset={scale.preset},top_k=1,{arg}"),
              scale, settings, seed=seed))
          for seed in range(settings.seeds) for arm, arg in ARMS.items()]


TABLES = [
    study.Table("modality", "Where the sparse experts are (top-1, 4 experts "
                "per pool)", ("dense", "text_moe", "image_moe", "both_moe")),
    study.Table("experts", "Experts per pool (both modalities, top-1)",
                ("dense", "both_moe", "both_moe_8", "both_moe_16")),
]


if __name__ == "__main__":
  study.run_command(
      runs, TABLES,
      "VL-MoE: modality-specific sparse experts at equal activated compute",
      1)
