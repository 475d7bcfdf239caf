r"""Omni-SMoLA's claim at small scale: soft mixtures of low-rank experts on a
frozen base make one generalist as good as specialists.

  python -m omnismola.experiments.smola --workdir=/tmp/study_smola

A dense base (configs/mix.py's preset, no experts) is pretrained on the
synthetic suite; every arm then starts from it with the same number of
steps, and sees the same examples of each task:

| arm | trains | data |
|---|---|---|
| base | nothing more (the pretrained base itself) | |
| full | every parameter | the mixture, batch B |
| lora | a LoRA on every decoder linear, rank matched to smola's trained parameters; base frozen | the mixture, batch B |
| smola | SMoLA text/image/all pools, 4 experts each, rank 4; base frozen | the mixture, batch B |
| specialists | every parameter, one model per task | its task, batch B / tasks |
| smola_specialists | smola's adapters, one model per task, started from smola | its task, batch B / tasks |

A specialist sees the examples of its task a generalist sees, in as many
steps, at the same compute; smola_specialists spend that budget again on
top of smola's, as the paper's specialists start from its generalist.
Ablations (smola's budget): 12 experts pooled otherwise, and experts per
pool (1, 4, 16).

Scale: the `small` preset; the base trains 600 steps of batch 48, every
arm 200 (a specialist: batch 8). --seeds (default 3) applies to the
generalists and specialists; the ablations take one seed. Learning rates:
3e-4 for full fine-tuning, 1e-3 for adapters. `--arms=full,specialists`
measures task interference alone.
"""

from omnismola.experiments import study

TASKS = study.TASKS
# Every linear layer of the decoder blocks (as configs/mix.py).
DECODER_LINEARS = r"decoder/layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))"
ADAPTERS = r".*/adapters/.*"
LR_FULL, LR_ADAPTERS = 3e-4, 1e-3


# The base trains BASE_STEPS_FACTOR times an arm's steps.
FULL = study.Scale(batch_size=48, steps=200)
BASE_STEPS_FACTOR = 3


def smola_experts(pools: dict[str, int], rank: int = 4) -> list[dict]:
  return [dict(kind="smola", targets=DECODER_LINEARS, pools=pools, rank=rank,
               slots_per_expert=1)]


def lora_experts(rank: int) -> list[dict]:
  return [dict(kind="lora", targets=DECODER_LINEARS, rank=rank)]


def base_config(scale: study.Scale, settings: study.Settings):
  """configs/mix.py at `scale` without experts, trained from scratch."""
  c = study.load_config("mix.py", f"preset={scale.preset}")
  c.experts = []
  return study.configure(c, scale, settings,
                         steps=BASE_STEPS_FACTOR * scale.steps)


def arm_config(base, scale: study.Scale, settings: study.Settings, *,
               seed: int, experts: list[dict], trainable: str, lr: float,
               task: str | None = None):
  """An arm's config: `base` with experts, what trains, the seed, and for
  a specialist its task alone at the task's share of the batch."""
  c = study.configure(study.copy(base), scale, settings, seed=seed, lr=lr)
  c.experts = experts
  c.train.trainable = trainable
  if task:
    c.data.mixture = task
    c.train.batch_size = scale.batch_size // len(TASKS)
  return c


def matched_lora_rank(config, target: int) -> int:
  """The LoRA rank whose trained parameters come closest to `target`."""
  def trained(rank):
    c = study.copy(config)
    c.experts = lora_experts(rank)
    return study.cost(c)["trainable_params"]
  return max(1, round(target / trained(1)))  # Linear in the rank.


def runs(settings: study.Settings) -> list[study.Run]:
  scale = study.QUICK if settings.quick else FULL
  base = base_config(scale, settings)
  out = [study.Run("base", "base", 0, base)]

  def add(arm, seed, experts, trainable, lr, task=None, starts_from="base"):
    name = f"{arm}/{task.removeprefix('synthetic_')}" if task else arm
    out.append(study.Run(
        f"{name}/seed{seed}", arm, seed,
        arm_config(base, scale, settings, seed=seed, experts=experts,
                   trainable=trainable, lr=lr, task=task),
        tasks=(task,) if task else (), starts_from=starts_from))

  pools = dict(text=4, image=4, all=4)
  smola = arm_config(base, scale, settings, seed=0, experts=smola_experts(pools),
                     trainable=ADAPTERS, lr=LR_ADAPTERS)
  rank = matched_lora_rank(smola, study.cost(smola)["trainable_params"])
  for seed in range(settings.seeds):
    add("full", seed, [], ".*", LR_FULL)
    add("lora", seed, lora_experts(rank), ADAPTERS, LR_ADAPTERS)
    add("smola", seed, smola_experts(pools), ADAPTERS, LR_ADAPTERS)
    for task in TASKS:
      add("specialists", seed, [], ".*", LR_FULL, task)
    for task in TASKS:
      add("smola_specialists", seed, smola_experts(pools), ADAPTERS,
          LR_ADAPTERS, task, starts_from=f"smola/seed{seed}")
  for arm, ablation_pools in ABLATIONS.items():
    add(arm, 0, smola_experts(ablation_pools), ADAPTERS, LR_ADAPTERS)
  return out


# Beside smola's 3 pools of 4: 12 experts pooled otherwise, 1 or 16 a pool.
ABLATIONS = {
    "smola_all12": dict(all=12),
    "smola_text6_image6": dict(text=6, image=6),
    "smola_1": dict(text=1, image=1, all=1),
    "smola_16": dict(text=16, image=16, all=16),
}


TABLES = [
    study.Table("generalists", "Generalists and specialists from one "
                "frozen base", ("base", "full", "lora", "smola",
                                "specialists", "smola_specialists")),
    study.Table("pools", "SMoLA pools at 12 experts",
                ("smola_all12", "smola_text6_image6", "smola")),
    study.Table("experts", "SMoLA experts per pool",
                ("smola_1", "smola", "smola_16")),
]


if __name__ == "__main__":
  study.run_command(
      runs, TABLES,
      "Omni-SMoLA: soft mixtures of low-rank experts on a frozen base", 3)
