r"""docs/finetune.md, run: every command of the guide, in its order.

The commands are read from the guide with tests/test_docs_commands.py's
extraction and run on a tiny stand-in:

* the placeholders become the tiny PaliGemma of tests/tiny_paligemma.py
  (`$HOME/paligemma-3b-pt-224` its Hugging Face directory,
  `$HOME/pt_224.npz` its big_vision file, `$HOME/paligemma_tokenizer.model`
  its SentencePiece model), any other `$HOME` a fresh folder, and
  `gs://my-bucket` a local folder standing for the bucket (`gcloud storage
  cp` copies into it); the `paligemma_3b_224` preset gets the tiny model's
  sizes (the `tiny_paligemma_3b` fixture);
* `$HOME/mydata` is a JSON-lines dataset this test writes: 32×32 PNGs of a
  coloured square, "what color is the square?", train / validation / test
  and $HOME/prompts.jsonl for `--predict_file`;
* `python -m omnismola.convert` runs as a subprocess; `python -m
  omnismola.main` in this process (where the preset is patched), with
  TINY_VALUES replacing the guide's step counts and batch size and
  TINY_OVERRIDES appended (the same to every run, so resumes see an
  unchanged config);
* `launch/tpu_vm.sh` commands run with `--dry-run` (and a `gcloud` that
  fails if called); the main command `run` forwards is then run here, on
  the local folder standing for the bucket: the GCS emulator of
  tests/test_storage_gcs.py cannot serve the tokenizer, which TensorFlow's
  own GCS client reads (docs/training.md, "Storage");
* `head -n N FILE` reads the file.

A command main.py stops with an error (exit status 1) must be followed by
a `text` block starting with `error:`, its standard error; any other
command must succeed.

Each `text` block after a command block is output that command printed:
its lines must appear, in order and consecutively, in what the last
command of that block wrote to stdout (stderr, for an error), with the
fresh folder shown as `/home/me` and `<N>` standing for a number that
depends on timing (examples per second, ETA). A `json` block is an example
line: one of the lines this test writes.
"""
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from test_docs_commands import (code_blocks, extract_commands,
                                logical_lines, main_flags, split_commands,
                                split_environment)
from tiny_paligemma import tiny_paligemma, tiny_paligemma_3b  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "finetune.md")
BUCKET = "gs://my-bucket"
SHOWN_HOME = "/home/me"
NUMBER = "<N>"  # In a shown line: a number that depends on timing.

# The guide's values -> the stand-in's (8 fake CPU devices: batches of 8).
TINY_VALUES = {
    "--config.train.steps=1000": "--config.train.steps=4",
    "--config.train.steps=2000": "--config.train.steps=6",
    "--config.train.batch_size=32": "--config.train.batch_size=8",
    "--config.train.batch_size=64": "--config.train.batch_size=16",
}
STEPS = {"1000": "4", "2000": "6"}
# Appended to every main.py run.
TINY_OVERRIDES = (
    "--config.train.warmup_steps=1", "--config.train.log_every=2",
    "--config.train.checkpoint_every=2", "--config.data.shuffle_buffer=16",
    "--config.eval.batch_size=8", "--config.eval.max_new_tokens=4",
    # The evaluation after training compiles the decoder once more per run;
    # the guide's --mode=eval commands run it.
    "--config.eval.at_end=False")

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220),
          "gold": (230, 190, 20)}
SPLITS = {"train": 24, "validation": 8, "test": 8}


def write_dataset(folder) -> None:
  """$HOME/mydata: images/<i>.png and <split>.jsonl; $HOME/prompts.jsonl."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(folder, "images"))
  names = sorted(COLORS)
  i = 0
  for split, count in SPLITS.items():
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
      for _ in range(count):
        color = names[i % len(names)]
        pixels = np.full((32, 32, 3), 255, np.uint8)
        lo = 4 + i % 9
        pixels[lo:lo + 16, lo:lo + 16] = COLORS[color]
        Image.fromarray(pixels).save(os.path.join(folder, "images",
                                                  f"{i}.png"))
        f.write(json.dumps(dict(image=f"images/{i}.png",
                                question="what color is the square?",
                                answer=color, id=f"q{i}")) + "\n")
        i += 1
  # Beside the folder: every .jsonl in it is a split.
  with open(os.path.join(folder, "..", "prompts.jsonl"), "w") as f:
    for j in range(3):
      f.write(json.dumps(dict(image=f"mydata/images/{j}.png",
                              prompt="answer en what color is the square?",
                              id=f"p{j}"))
              + "\n")


class Guide:
  """Runs the guide's commands; `output` is the last one's stdout."""

  def __init__(self, tiny, tmp_path, capsys, monkeypatch):
    self.tmp = tmp_path
    self.home = str(tmp_path / "home")
    self.bucket = str(tmp_path / "bucket")
    os.makedirs(self.home)
    os.makedirs(self.bucket)
    self.files = {
        "$HOME/paligemma-3b-pt-224": tiny.hf_dir,
        "$HOME/pt_224.npz": tiny.big_vision_npz,
        "$HOME/paligemma_tokenizer.model": tiny.tokenizer,
    }
    self.capsys, self.monkeypatch = capsys, monkeypatch
    self.env = {}  # From the guide's `export`s.
    self.output = ""
    self.failed = False  # Whether the last command stopped with an error.
    self.converted = 0
    self.ran = []
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    gcloud = stubs / "gcloud"
    gcloud.write_text("#!/bin/sh\necho \"gcloud called: $*\" >&2\nexit 97\n")
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    self.path = f"{stubs}:{os.environ['PATH']}"

  def local(self, value: str) -> str:
    """A token with the stand-in's files and folders for the placeholders."""
    for placeholder, path in self.files.items():
      value = value.replace(placeholder, path)
    for step, tiny_step in STEPS.items():  # Files named by the step.
      value = value.replace(f"_{step}.jsonl", f"_{tiny_step}.jsonl")
    return value.replace("$HOME", self.home).replace(BUCKET, self.bucket)

  def shown(self, text: str) -> str:
    return text.replace(self.home, SHOWN_HOME)

  def run(self, env, argv) -> None:
    start = time.perf_counter()
    self._run(env, argv)
    sys.__stderr__.write(f"[{time.perf_counter() - start:.0f} s] "
                         f"{' '.join(argv)[:100]}\n")

  def _run(self, env, argv) -> None:
    self.ran.append(" ".join(env + argv))
    if argv[0] == "export":
      self.env.update(a.split("=", 1) for a in argv[1:])
    elif argv[0] == "head":
      assert argv[1] == "-n", argv
      with open(self.local(argv[3])) as f:
        self.output = "".join(f.readlines()[:int(argv[2])])
    elif argv[:3] == ("gcloud", "storage", "cp"):
      *sources, target = [a for a in argv[3:] if a != "-r"]
      for source in sources:
        copy = shutil.copytree if os.path.isdir(self.local(source)) else (
            shutil.copy)
        copy(self.local(source), self.local(target))
    elif argv[:3] == ("python", "-m", "omnismola.convert"):
      self.convert(argv[3:])
    elif argv[:3] == ("python", "-m", "omnismola.main"):
      self.main(argv[3:])
    elif argv[0] == "launch/tpu_vm.sh":
      self.launch(env, argv)
    else:
      raise AssertionError(f"the guide runs {argv}, which this test does "
                           "not know how to run")

  def convert(self, args) -> None:
    args = [self.local(a) for a in args]
    self.converted += 1
    if self.converted > 1:  # The alternative: a folder of its own.
      args = [f"--output={self.tmp}/converted_{self.converted}"
              if a.startswith("--output=") else a for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "omnismola.convert", *args], cwd=ROOT,
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    self.output = result.stdout

  def main(self, args) -> None:
    args = [self.local(TINY_VALUES.get(a, a)) for a in args]
    args += TINY_OVERRIDES
    self.capsys.readouterr()
    try:
      with main_flags(args, self.monkeypatch) as main:
        self.monkeypatch.setattr(main, "initialize_distributed",
                                 lambda *_: None)
        main.main([])
    except SystemExit as e:  # An error the guide shows (checked there).
      assert e.code == 1, e.code
      self.output = self.capsys.readouterr().err
      self.failed = True
      return
    self.output = self.capsys.readouterr().out
    # Shown where pytest's -s would show it.
    sys.__stderr__.write(self.output)

  def launch(self, env, argv) -> None:
    argv = list(argv)
    argv.insert(2, "--dry-run")
    result = subprocess.run(
        ["bash", "-c", " ".join(shlex.quote(a) for a in argv)], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PATH=self.path, **self.env,
                 **dict(e.split("=", 1) for e in env)))
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    assert "gcloud called" not in result.stderr, result.stderr
    self.output = result.stdout
    if argv[1] == "run":
      forwarded = argv[argv.index("--") + 1:]
      # What every worker starts, quoted for the remote shell.
      assert "python3 -m omnismola.main " + " ".join(
          shlex.quote(a) for a in forwarded) in result.stdout
      launch_output = result.stdout
      self.main(forwarded)
      self.output = launch_output


def shown_mismatch(text_block: str, output: str, where: str) -> str | None:
  """None if the block's lines are consecutive lines of output, else why."""
  expected = [l.rstrip() for l in text_block.splitlines()]
  lines = [l.rstrip() for l in output.splitlines()]
  patterns = [re.compile(re.escape(l).replace(re.escape(NUMBER), r"[\d.,:]+"))
              for l in expected]
  for start in range(len(lines) - len(expected) + 1):
    if all(p.fullmatch(l) for p, l in zip(patterns, lines[start:])):
      return None
  return (f"{where}: the guide shows\n{text_block}\nbut the command "
          f"printed\n{output}")


@pytest.mark.slow
def test_every_command_of_the_guide_runs_and_prints_what_it_shows(
    tiny_paligemma_3b, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  guide = Guide(tiny_paligemma_3b, tmp_path, capsys, monkeypatch)
  write_dataset(os.path.join(guide.home, "mydata"))
  with open(GUIDE) as f:
    text = f.read()
  examples = set()
  for name in ("mydata/train.jsonl", "prompts.jsonl"):
    with open(os.path.join(guide.home, name)) as f:
      examples.update(f.read().splitlines())
  commands = checked = 0
  mismatches = []  # All of them reported at the end.
  after_commands = False  # A text block may show the last command's output.
  for tag, lines in code_blocks(text):
    where = f"docs/finetune.md:{lines[0][0] if lines else '?'}"
    if tag == "bash":
      variables = {}
      for _, line in logical_lines(tag, lines):
        for tokens in split_commands(line, variables):
          assert not guide.failed, f"{where}: {guide.output}"
          env, argv = split_environment(tokens)
          guide.run(env, argv)
          commands += 1
      after_commands = True
    elif tag == "text" and after_commands:
      block = "\n".join(l for _, l in lines)
      # A command fails where the guide shows its error, and only there.
      assert block.startswith("error:") == guide.failed, (
          f"{where}: {guide.output}")
      guide.failed = False
      mismatches.append(shown_mismatch("\n".join(l for _, l in lines),
                                       guide.shown(guide.output), where))
      checked += 1
    elif tag == "json":  # An example line: one of the stand-in's files.
      (line,) = [l.strip() for _, l in lines]
      assert line in examples, (where, line)
      checked += 1
    elif tag != "text":
      after_commands = False
  assert not guide.failed, guide.output
  # Every project command the docs test finds in the guide was run here.
  assert {c.text for c in extract_commands(text, GUIDE)} <= set(guide.ran)
  mismatches = [m for m in mismatches if m]
  assert not mismatches, "\n\n".join(mismatches)
  assert commands >= 19 and checked >= 9, (commands, checked)
  # The runs made what the guide says they make.
  home = guide.home
  assert os.path.isdir(f"{home}/runs/pg_smola/checkpoints/6")
  assert os.path.isfile(
      f"{home}/runs/pg_smola/eval/predictions_mydata_test_6.jsonl")
  assert os.path.isdir(f"{guide.bucket}/runs/pg_smola/checkpoints/4")
