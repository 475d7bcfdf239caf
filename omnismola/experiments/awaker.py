r"""Awaker2.5-VL's recipe at small scale: LoRA, then routed LoRA experts,
then frozen gates, against one LoRA trained as long; with and without
the global expert.

  python -m omnismola.experiments.awaker --workdir=/tmp/study_awaker

Every run is configs/awaker.py (everything trains, from scratch); S is
one stage's steps:

| arm | runs |
|---|---|
| lora_3s | stage lora for 3 S steps |
| stage1 | stage lora for S steps (the staged arms' first stage) |
| staged | stage1, then stage moe (S), then stage frozen_gates (S) |
| staged_no_global | the same with `global_expert=False` in stages II and III |

Stage II copies stage I's LoRA into every expert (and the global expert),
so with the global expert it starts from stage I's function: the report
sets stage II's first loss beside stage I's last ones (the batches differ:
they agree within stage I's step-to-step spread).

Scale: the `small` preset, batch 32, S = 300 steps; one seed by default
(--seeds=N runs N).
"""
import numpy as np

from omnismola.experiments import study

FULL = study.Scale()
# Stage I's last steps, whose losses' spread stage II is set against.
LAST_STEPS = 10


def _stage(scale, settings, seed, stage, *, steps=0, global_expert=True,
           every_step=False):
  c = study.load_config(
      "awaker.py",
      f"preset={scale.preset},stage={stage},global_expert={global_expert}")
  c = study.configure(c, scale, settings, seed=seed, steps=steps)
  if every_step:
    c.train.log_every = 1
  return c


def runs(settings: study.Settings) -> list[study.Run]:
  scale = study.QUICK if settings.quick else FULL
  out = []
  for seed in range(settings.seeds):
    name = lambda arm: f"{arm}/seed{seed}"
    run = lambda arm, config, **kw: out.append(
        study.Run(name(arm), arm, seed, config, **kw))
    run("lora_3s", _stage(scale, settings, seed, "lora",
                          steps=3 * scale.steps))
    run("stage1", _stage(scale, settings, seed, "lora", every_step=True))
    for suffix, global_expert in (("", True), ("_no_global", False)):
      run(f"stage2{suffix}",
          _stage(scale, settings, seed, "moe", global_expert=global_expert,
                 every_step=True),
          starts_from=name("stage1"))
      run(f"staged{suffix}",
          _stage(scale, settings, seed, "frozen_gates",
                 global_expert=global_expert),
          starts_from=name(f"stage2{suffix}"))
  return out


TABLES = [
    study.Table("stages", "One LoRA for 3 S steps vs LoRA → MoE → frozen "
                "gates, S steps each",
                ("lora_3s", "stage1", "stage2", "staged")),
    study.Table("global_expert", "With and without the global expert",
                ("stage2", "staged", "stage2_no_global", "staged_no_global")),
]


def continuity(results: list[dict]) -> str:
  """Stage II's first loss beside stage I's last ones, per seed."""
  by_name = {r["name"]: r for r in results}
  lines = ["## Stage II starts where stage I ended", "",
           "| seed | stage I, last steps (mean ± sd) | stage II, step 1, "
           "global expert | without it |", "|---|---|---|---|"]
  for stage1 in (r for r in results if r["arm"] == "stage1"):
    seed = stage1["seed"]
    last = [loss for _, loss in stage1["losses"][-LAST_STEPS:]]
    first = lambda arm: by_name.get(f"{arm}/seed{seed}", {}).get(
        "losses", [(0, float("nan"))])[0][1]
    lines.append(f"| {seed} | {np.mean(last):.4f} ± {np.std(last):.4f} | "
                 f"{first('stage2'):.4f} | {first('stage2_no_global'):.4f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  study.run_command(runs, TABLES, "Awaker2.5-VL: staged routed LoRA experts",
                    1, notes=continuity)
