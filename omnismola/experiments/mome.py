r"""MoME's vision-encoder ablation at small scale: one encoder, two encoders
added, two encoders mixed by the instance-level router (MoVE).

  python -m omnismola.experiments.mome --workdir=/tmp/study_mome

MoME mixes encoders that were pretrained apart and are good at different
things (CLIP, DINOv2, Pix2Struct). Here two encoders are pretrained first,
each in a one-encoder model of its own on one skill group of the suite:

| run | encoder | pretrained on |
|---|---|---|
| coarse_encoder | the preset's ViT | synthetic_scene_mix (captioning, VQA, counting) |
| fine_encoder | half its patch size and width (4x the tokens) | synthetic_reading_mix (OCR, ChartQA, document QA) |

Every arm is then configs/mome.py's first stage (one adapter beside every
decoder MLP, so only the vision side differs), trained on the whole
mixture with the same steps and batch, its encoders loaded from those runs
(`init.parts`) and everything else fresh:

| arm | configs/mome.py argument | encoders |
|---|---|---|
| one_encoder | encoders=1 | coarse |
| two_added | mixer=add: the encoders' adapted tokens summed | coarse + fine |
| two_routed | the default: MoVE's soft router over the instruction | coarse + fine |

Scale: the `small` preset, batch 32; each encoder pretrains 300 steps,
each arm trains 400; one seed by default (--seeds=N runs N).
"""
from omnismola.experiments import study

FULL = study.Scale(steps=400)
PRETRAIN_STEPS_FRACTION = 0.75
ARMS = {
    "one_encoder": "encoders=1",
    "two_added": "mixer=add",
    "two_routed": "mixer=router",
}


def _config(scale, settings, seed, arg, steps=0):
  return study.configure(
      study.load_config("mome.py", f"preset={scale.preset},stage=single,"
                        f"{arg}"), scale, settings, seed=seed, steps=steps)


def _encoder_run(scale, settings, seed, name, mixture, fine) -> study.Run:
  """A one-encoder model pretrained on `mixture`: the preset's ViT, or with
  `fine` the second encoder of configs/mome.py in its place."""
  c = _config(scale, settings, seed, "encoders=1",
              steps=max(1, int(PRETRAIN_STEPS_FRACTION * scale.steps)))
  if fine:
    two = study.load_config("mome.py", f"preset={scale.preset}")
    c.model.vit = two.model.extra_vits[0]
  c.data.mixture = mixture
  return study.Run(f"{name}/seed{seed}", name, seed, c)


def runs(settings: study.Settings) -> list[study.Run]:
  scale = study.QUICK if settings.quick else FULL
  out = []
  for seed in range(settings.seeds):
    coarse, fine = f"coarse_encoder/seed{seed}", f"fine_encoder/seed{seed}"
    out += [_encoder_run(scale, settings, seed, "coarse_encoder",
                         "synthetic_scene_mix", fine=False),
            _encoder_run(scale, settings, seed, "fine_encoder",
                         "synthetic_reading_mix", fine=True)]
    for arm, arg in ARMS.items():
      parts = [("vit", coarse, "vit")]
      if arm != "one_encoder":
        parts.append(("vit_1", fine, "vit"))
      out.append(study.Run(f"{arm}/seed{seed}", arm, seed,
                           _config(scale, settings, seed, arg),
                           parts_from=tuple(parts)))
  return out


TABLES = [study.Table("encoders", "One encoder, two added, two routed "
                      "(encoders pretrained on different task groups)",
                      tuple(ARMS))]


if __name__ == "__main__":
  study.run_command(runs, TABLES, "MoME: a mixture of vision encoders", 1)
