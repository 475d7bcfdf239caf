r"""MoME's vision-encoder ablation at small scale: one encoder, two encoders
added, two encoders mixed by the instance-level router (MoVE).

  python -m omnismola.experiments.mome --workdir=/tmp/study_mome

Every arm is configs/mome.py's first stage (one adapter beside every
decoder MLP, so only the vision side differs) trained from scratch with
the same steps and batch. The two encoders differ: the preset's ViT and a
narrower one with half its patch size (a finer grid of the same image).

| arm | configs/mome.py argument |
|---|---|
| one_encoder | encoders=1 |
| two_added | mixer=add: the encoders' adapted tokens summed |
| two_routed | the default: MoVE's soft router over the instruction |

Scale: the `small` preset, 400 steps of batch 32 per arm; one seed by
default (--seeds=N runs N).
Scores are on the validation split; nothing was tuned.
"""

from omnismola.experiments import study

FULL = study.Scale(preset="small", batch_size=32, steps=400,
                   eval_examples=256, max_new_tokens=32)
ARMS = {
    "one_encoder": "encoders=1",
    "two_added": "mixer=add",
    "two_routed": "mixer=router",
}


def runs(settings: study.Settings) -> list[study.Run]:
  return study.runs_from_arguments(
      settings, study.QUICK if settings.quick else FULL, "mome.py",
      "stage=single", ARMS)


def tables(settings: study.Settings) -> list[study.Table]:
  del settings
  return [study.Table("encoders", "One encoder, two added, two routed",
                      tuple(ARMS))]


if __name__ == "__main__":
  study.run_command(runs, tables, "MoME: a mixture of vision encoders", 1)
