"""The studies of omnismola/experiments: the report's arithmetic here, each
study's documented command with --quick in the slow suite (the machinery:
arms built, parameters matched, tables and plots written; not the
numbers)."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from omnismola import errors
from omnismola.experiments import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(arm, seed, scores, params=10, seconds=60.0):
  return dict(arm=arm, seed=seed, scores=scores, trainable_params=params,
              train_flops=3e9, forward_flops=1e9, seconds=seconds)


def test_summary_merges_runs_of_a_seed_and_averages_over_seeds():
  # Specialists: one run per task; two seeds.
  results = [_result("spec", 0, {"a": 10.0}), _result("spec", 0, {"b": 30.0}),
             _result("spec", 1, {"a": 20.0}), _result("spec", 1, {"b": 50.0}),
             _result("other", 0, {"a": 99.0, "b": 99.0})]
  s = study.summarize(results, "spec", ["a", "b"])
  assert s.seeds == 2
  assert s.mean == {"a": 15.0, "b": 40.0}
  np.testing.assert_allclose(s.sd["a"], np.std([10, 20], ddof=1))
  # Per-seed averages 20 and 35.
  assert s.average == 27.5
  np.testing.assert_allclose(s.average_sd, np.std([20, 35], ddof=1))
  assert s.trainable_params == 20  # Both of one seed's models.
  assert s.minutes == 4.0
  assert study.summarize(results, "missing", ["a"]) is None


def test_one_seed_has_no_spread_and_a_missing_task_no_average():
  s = study.summarize([_result("x", 0, {"a": 1.0})], "x", ["a", "b"])
  assert np.isnan(s.sd["a"]) and np.isnan(s.average)
  row = study.markdown_table([s], ["synthetic_a", "b"]).splitlines()[2]
  assert row.startswith("| x | – | – | – | 1 | 10 |")


def test_markdown_table_shows_mean_and_sd():
  s = study.summarize([_result("x", 0, {"synthetic_a": 1.0}),
                       _result("x", 1, {"synthetic_a": 3.0})],
                      "x", ["synthetic_a"])
  header, _, row = study.markdown_table([s], ["synthetic_a"]).splitlines()
  assert header.startswith("| arm | a | average | seeds |")
  assert row.startswith("| x | 2.0 ± 1.4 | 2.0 ± 1.4 | 2 |")


def _run(name, arm, starts_from=None, parts_from=()):
  return study.Run(name, arm, 0, ml_collections.ConfigDict(),
                   starts_from=starts_from, parts_from=parts_from)


def test_select_keeps_what_the_arms_start_from():
  runs = [_run("base", "base"), _run("a", "a", "base"), _run("b", "b", "a"),
          _run("c", "c", "base"), _run("enc", "enc"),
          _run("d", "d", parts_from=(("vit", "enc", "vit"),))]
  assert [r.name for r in study.select(runs, ["b"])] == ["base", "a", "b"]
  assert [r.name for r in study.select(runs, ["c"])] == ["base", "c"]
  assert [r.name for r in study.select(runs, ["d"])] == ["enc", "d"]
  with pytest.raises(errors.InputError, match=r"unknown \['e'\]"):
    study.select(runs, ["e"])


def test_a_result_saved_before_a_field_was_added_is_reused_at_its_default():
  current = study._config_record(study.load_config("mix.py", "preset=tiny"))
  older = json.loads(json.dumps(current))
  del older["init"]["parts"]  # A field the schema gained since.
  assert study.same_run(older, current)
  changed = json.loads(json.dumps(current))
  changed["init"]["parts"] = [["vit", "/runs/other", "vit"]]
  assert not study.same_run(older, changed)  # Not at its default.
  changed = json.loads(json.dumps(current))
  changed["train"]["steps"] += 1
  assert not study.same_run(current, changed)
  assert not study.same_run(current, older)  # A field the run lacks.


def test_smola_lora_rank_matches_smola_trained_parameters():
  from omnismola.experiments import smola  # pylint: disable=g-import-not-at-top
  settings = study.Settings(quick=False, seeds=1, tfds_data_dir=None)
  runs = {r.name: r for r in smola.runs(settings)}
  lora = study.cost(runs["lora/seed0"].config)["trainable_params"]
  target = study.cost(runs["smola/seed0"].config)["trainable_params"]
  rank = runs["lora/seed0"].config.experts[0]["rank"]
  per_rank = lora / rank
  assert abs(lora - target) <= per_rank / 2
  # Specialists: the task's share of the batch, the same steps.
  spec = runs["specialists/vqa/seed0"].config
  assert spec.data.mixture == "synthetic_vqa"
  assert spec.train.batch_size * len(smola.TASKS) == (
      runs["full/seed0"].config.train.batch_size)
  assert spec.train.steps == runs["full/seed0"].config.train.steps
  assert runs["smola_specialists/vqa/seed0"].starts_from == "smola/seed0"


def _study(module, workdir, data_dir, *extra, timeout=1500):
  command = [sys.executable, "-m", f"omnismola.experiments.{module}",
             f"--workdir={workdir}", "--quick", f"--tfds_data_dir={data_dir}",
             *extra]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _check_report(workdir, arms, tables):
  results = json.loads((workdir / "results.json").read_text())
  assert {r["arm"] for r in results} == set(arms)
  report = (workdir / "results.md").read_text()
  for key in tables:
    assert (workdir / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert f"({key}.png)" in report
  return results, report


@pytest.mark.slow
def test_smola_study_quick(synthetic_data_dir, tmp_path):
  workdir = tmp_path / "study"
  _study("smola", workdir, synthetic_data_dir)
  results, _ = _check_report(
      workdir, ["base", "full", "lora", "smola", "specialists",
                "smola_specialists", "smola_all12", "smola_text6_image6",
                "smola_1", "smola_16"], ["generalists", "pools", "experts"])
  # One specialist per task, each scored on its task alone.
  full = next(r for r in results if r["arm"] == "full")
  specialists = [r for r in results if r["arm"] == "specialists"]
  assert sorted(t for r in specialists for t in r["scores"]) == sorted(
      full["scores"])
  # Rerun: every result is there, nothing trains again.
  again = _study("smola", workdir, synthetic_data_dir, timeout=600)
  assert "Parameters:" not in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("module, arms, tables", [
    ("vlmoe", ["dense", "text_moe", "image_moe", "both_moe", "both_moe_8",
               "both_moe_16"], ["modality", "experts"]),
    ("cumo", ["dense_start", "dense", "upcycled", "scratch",
              "upcycled_no_aux", "scratch_no_aux"],
     ["upcycling", "aux_losses"]),
    ("mome", ["coarse_encoder", "fine_encoder", "one_encoder", "two_added",
              "two_routed"], ["encoders"]),
    ("awaker", ["lora_3s", "stage1", "stage2", "staged", "stage2_no_global",
                "staged_no_global"], ["stages", "global_expert"]),
])
def test_study_quick(module, arms, tables, synthetic_data_dir, tmp_path):
  _study(module, tmp_path, synthetic_data_dir)
  results, report = _check_report(tmp_path, arms, tables)
  by_arm = {r["arm"]: r for r in results}
  if module == "vlmoe":
    # Top-1: a token's work is the dense model's, routers aside.
    dense = by_arm["dense"]["forward_flops"]
    assert dense < by_arm["both_moe"]["forward_flops"] < 1.05 * dense
    assert (by_arm["both_moe"]["trainable_params"] <
            by_arm["both_moe_8"]["trainable_params"])
  if module == "mome":
    # Each encoder pretrained on its skill group; the arms load them.
    pretrained = {r["arm"]: r for r in results if r["arm"].endswith("encoder")}
    assert set(pretrained["coarse_encoder"]["scores"]) == {
        "synthetic_captioning", "synthetic_vqa", "synthetic_counting"}
    assert set(pretrained["fine_encoder"]["scores"]) == {
        "synthetic_ocr", "synthetic_chartqa", "synthetic_docqa"}
    parts = lambda arm: [(model, os.path.basename(os.path.dirname(run)), sub)
                         for model, run, sub in
                         by_arm[arm]["config"]["init"]["parts"]]
    assert parts("one_encoder") == [("vit", "coarse_encoder", "vit")]
    assert parts("two_routed") == [("vit", "coarse_encoder", "vit"),
                                   ("vit_1", "fine_encoder", "vit")]
  if module == "awaker":
    assert "Stage II starts where stage I ended" in report
    assert len(by_arm["stage1"]["losses"]) == by_arm["stage1"]["steps"]
