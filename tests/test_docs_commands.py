r"""Every shell command shown in README.md and docs/*.md is exercised.

Commands are read from fenced code blocks tagged bash, sh, shell or console
(`$ ` lines) and from untagged ones: `\` continuations are joined, `&&`, `;`,
`|` and `&` split a line into commands, leading `NAME=value` and `env -u NAME`
are kept apart as the command's environment. A command that runs project
code (python, pip, bash, sbatch, srun, or a script of this repository) must
be covered in one of three ways:

* `python -m omnismola.main ...` is parsed exactly as main.py parses it (the
  config file loaded with its `:args`, override keys checked, overrides
  applied, every flag validated), without training;
* any other `python -m MODULE` or `python SCRIPT.py` is run with `--help`:
  every flag the command passes must be one the program lists, with a value
  among its choices where it lists them; a `--config=FILE[:ARGS]` it is
  given must load, and its `--config.x` overrides name existing fields;
* anything else matches a pattern of COVERED_BY, which names the test (or
  .ci/run, for install and test-suite commands) that runs it; those tests
  must exist. Launch commands also have their forwarded `--config=...`
  arguments parsed as main.py would.

The commands of the config files' docstrings (configs/*.py) count too.
Commands on a pretrained PaliGemma are also run, on the tiny one of
tests/tiny_paligemma.py: each placeholder path of PALIGEMMA_FILES is
replaced by the file standing in for it, the `paligemma_3b_224` preset by
the tiny model's shapes (its `tiny_paligemma_3b` fixture), workdirs and
outputs by fresh folders, and main.py runs get RUN_OVERRIDES (a few steps
on the small synthetic suite; those runs take minutes on 2 cores, so they
are in the slow suite).
"""
import ast
import contextlib
import dataclasses
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from tiny_paligemma import tiny_paligemma, tiny_paligemma_3b  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs",
                                                             "*.md")))
CONFIGS = sorted(os.path.relpath(p, ROOT)
                 for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))

# The docs' placeholder paths of a pretrained PaliGemma -> the attribute of
# tiny_paligemma.TinyPaliGemma that stands in for it.
PALIGEMMA_FILES = {
    "HF_DIR": "hf_dir",
    "/ckpt/paligemma-3b-pt-224": "hf_dir",
    "/ckpt/pt_224.npz": "big_vision_npz",
    "PG": "converted_dir",
    "/ckpt/omni-pg3b": "converted_dir",
    "/ckpt/paligemma_tokenizer.model": "tokenizer",
}
# What a run of a docs' main.py command on the tiny PaliGemma adds.
RUN_OVERRIDES = (
    "--config.train.steps=2", "--config.train.batch_size=2",
    "--config.train.warmup_steps=0", "--config.train.log_every=1",
    "--config.data.shuffle_buffer=8", "--config.eval.batch_size=2",
    "--config.eval.max_examples=2", "--config.eval.max_new_tokens=3",
    "--config.eval.tasks=synthetic_vqa")

# {regex fully matching a command's text: the test that runs it}. A test is
# "tests/FILE.py::NAME"; ".ci/run" means CI runs the command (the pattern
# must then match a command of .ci/run too).
COVERED_BY = {
    r"python3? -m venv \S+": ".ci/run",
    r"pip install( -q)? -e \.(\[test\])?": ".ci/run",
    r"pip install( -q)? torch==\S+": ".ci/run",
    r"python -m pytest -q( -m slow)?": ".ci/run",
    # docs/launch.md's console examples, run and compared with their output.
    r"(env( -u \w+)+ )?launch/tpu_vm\.sh \w+ (\S+ )*--dry-run( .*)?":
        "tests/test_launch.py::test_docs_examples_are_real_output",
    r"(DRY_RUN=1 (\w+=\S+ )*)?bash launch/gpu_slurm\.sbatch .*":
        "tests/test_launch.py::test_docs_examples_are_real_output",
    r"sbatch launch/gpu_slurm\.sbatch .*":
        "tests/test_launch.py::test_slurm_dry_run_prints_what_runs",
    r"srun (--\S+ )*launch/gpu_multinode\.sh .*":
        "tests/test_launch.py::test_multinode_per_process",
    r"bash benchmarks/gpu\.sh( \S+)?":
        "tests/test_benchmarks.py::test_gpu_script_runs_on_tiny_shapes",
    # docs/finetune.md's pod commands, run with --dry-run in the guide's
    # order (the forwarded main command then runs on a local folder).
    r"launch/tpu_vm\.sh (create|install|run|logs)( (?!--dry-run)\S+)*( -- .*)?":
        "tests/test_finetune_guide.py::"
        "test_every_command_of_the_guide_runs_and_prints_what_it_shows",
}

_FENCE = re.compile(r"^\s*```\s*(\S*)")
_SHELL_TAGS = ("bash", "sh", "shell", "console", "")
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
_KEYWORDS = {"do", "then", "else", "!", "{"}
_PROGRAMS = {"python", "python3", "pip", "pip3", "bash", "sh", "sbatch",
             "srun"}


@dataclasses.dataclass(frozen=True)
class Command:
  """One command of a doc: where it is, its environment prefix and argv."""
  where: str
  env: tuple[str, ...]
  argv: tuple[str, ...]

  @property
  def text(self) -> str:
    return " ".join(self.env + self.argv)


# ---------------------------------------------------------------- extraction

def code_blocks(text: str):
  """Yields (tag, [(line number, line)]) of every fenced block."""
  tag, lines = None, []
  for number, line in enumerate(text.splitlines(), 1):
    fence = _FENCE.match(line)
    if fence and tag is None:
      tag, lines = fence.group(1), []
    elif fence:
      yield tag, lines
      tag = None
    elif tag is not None:
      lines.append((number, line))


def logical_lines(tag: str, lines):
  """(line number, text) with continuations joined; console: `$ ` lines."""
  out, pending = [], None
  for number, line in lines:
    if pending is None:
      if tag == "console":
        if not line.startswith("$ "):
          continue
        line = line[2:]
      pending = (number, "")
    start, text = pending
    if line.endswith("\\"):
      pending = (start, text + line[:-1])
    else:
      out.append((start, text + line))
      pending = None
  return out


def split_commands(line: str, variables: dict) -> list[list[str]]:
  """The commands of one shell line as token lists; `for` loop variables
  are recorded in `variables` and later `$NAME`s take their first value."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
  lexer.whitespace_split = True
  commands = [[]]
  for token in lexer:
    if token in _SEPARATORS:
      commands.append([])
    else:
      commands[-1].append(token)
  out = []
  for tokens in filter(None, commands):
    if tokens[0] == "for" and len(tokens) > 3 and tokens[2] == "in":
      variables[tokens[1]] = tokens[3]
      continue
    for name, value in variables.items():
      tokens = [re.sub(r"\$\{?%s\}?(?!\w)" % name, value, t) for t in tokens]
    out.append(tokens)
  return out


def split_environment(tokens: list[str]):
  """(environment prefix, argv): `NAME=v`, `env -u NAME` and shell keywords
  before the program are not part of its argv."""
  env, i = [], 0
  while i < len(tokens):
    token = tokens[i]
    if token in _KEYWORDS:
      i += 1
    elif _ASSIGNMENT.match(token) or token == "env":
      env.append(token)
      i += 1
    elif token == "-u" and env and i + 1 < len(tokens):
      env += tokens[i:i + 2]
      i += 2
    else:
      break
  return tuple(env), tuple(tokens[i:])


def is_project_program(program: str) -> bool:
  """Python, pip, shells and SLURM, or an executable script of this repo."""
  if program in _PROGRAMS:
    return True
  path = os.path.join(ROOT, program)
  return "/" in program and os.path.isfile(path) and os.access(path, os.X_OK)


def extract_commands(text: str, name: str) -> list[Command]:
  """Every project command in the shell code blocks of a markdown text."""
  commands = []
  for tag, lines in code_blocks(text):
    if tag not in _SHELL_TAGS:
      continue
    variables = {}
    for number, line in logical_lines(tag, lines):
      try:
        parts = split_commands(line, variables)
      except ValueError:
        if tag:
          raise ValueError(f"{name}:{number}: cannot parse {line!r}")
        continue  # An untagged block may be prose or a diagram.
      for tokens in parts:
        env, argv = split_environment(tokens)
        if argv and is_project_program(argv[0]):
          commands.append(Command(f"{name}:{number}", env, argv))
  return commands


def doc_commands() -> list[Command]:
  commands = []
  for doc in DOCS:
    with open(os.path.join(ROOT, doc)) as f:
      commands += extract_commands(f.read(), doc)
  for config in CONFIGS:
    with open(os.path.join(ROOT, config)) as f:
      docstring = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
    # Read as an untagged block (its prose lines are no commands) whose
    # fence line stands for the file's first line.
    for command in extract_commands(f"```\n{docstring}\n```", config):
      line = int(command.where.rpartition(":")[2]) - 1
      commands.append(dataclasses.replace(command, where=f"{config}:{line}"))
  return commands


# ------------------------------------------------------------------ coverage

def runs_main(command: Command) -> bool:
  return (command.argv[0].startswith("python") and
          command.argv[1:3] == ("-m", "omnismola.main"))


def main_args(command: Command) -> list[str] | None:
  """The arguments omnismola.main gets from this command, if it runs it:
  directly, or forwarded by a launch script (from `--config=` on)."""
  argv = list(command.argv)
  if runs_main(command):
    return argv[3:]
  if "launch/" in " ".join(argv[:2]):
    starts = [i for i, a in enumerate(argv) if a.startswith("--config=")]
    return argv[starts[0]:] if starts else None
  return None


def python_program(command: Command) -> list[str] | None:
  """[-m MODULE] or [SCRIPT.py] of a python command, else None."""
  argv = list(command.argv)
  if not argv[0].startswith("python") or len(argv) < 2:
    return None
  if argv[1] == "-m" and len(argv) > 2:
    return argv[1:3]
  return argv[1:2] if argv[1].endswith(".py") else None


def mapped_test(command: Command) -> str | None:
  for pattern, test in COVERED_BY.items():
    if re.fullmatch(pattern, command.text):
      return test
  return None


def coverage(command: Command) -> str | None:
  """How the command is exercised: 'main', a mapped test, 'help' or None."""
  if runs_main(command):
    return "main"
  return mapped_test(command) or ("help" if python_program(command) else None)


@contextlib.contextmanager
def main_flags(args: list[str], monkeypatch):
  """main.py's own flag parsing of `args`; unparsed again afterwards."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from omnismola import main  # pylint: disable=g-import-not-at-top
  argv = ["omnismola.main", *args]
  # ml_collections reads the --config.x overrides from sys.argv.
  monkeypatch.setattr(sys, "argv", argv)
  try:
    main.parse_flags(argv)
    yield main
  finally:
    # Back to unparsed, without the override flags this config defined
    # (the next command's config defines its own).
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)


def parse_main_args(args: list[str], capsys, monkeypatch) -> str | None:
  """main.py's own flag parsing of `args`; the error it prints, or None."""
  try:
    with main_flags(args, monkeypatch):
      pass
  except SystemExit:
    return capsys.readouterr().err.strip() or "exited"
  return None


@functools.cache
def help_text(program: tuple[str, ...]) -> str:
  """The flags `python PROGRAM --help` lists (absl exits 1 after it,
  argparse 0), without the description: a docstring's examples would
  vouch for any flag they mention."""
  result = subprocess.run([sys.executable, *program, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  listing = re.split(r"^(?:flags|options|optional arguments):$",
                     result.stdout, maxsplit=1, flags=re.M)
  assert len(listing) == 2, (program, result.stdout[-2000:],
                             result.stderr[-2000:])
  return listing[1]


def config_error(args: list[str]) -> str | None:
  """For a program other than main.py given --config=FILE[:ARGS]: the error
  loading it or naming a missing field in a --config.x override, or None."""
  from omnismola import config_lib  # pylint: disable=g-import-not-at-top
  specs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
  if not specs:
    return None
  try:
    config_lib.check_override_keys(config_lib.load_config_file(specs[0]),
                                   args)
  except (ValueError, FileNotFoundError) as e:  # Bad keys, args or stages.
    return str(e)
  return None


def unknown_flags(args: list[str], help_output: str) -> list[str]:
  """The `--name[=value]` of args the help does not list, or whose value is
  not among the choices it lists (argparse `{a,b}`, absl `<a|b>`)."""
  bad = []
  for arg in args:
    if not arg.startswith("--") or arg == "--" or arg.startswith("--config."):
      continue  # --config.x overrides are fields: config_error checks them.
    name, has_value, value = arg[2:].partition("=")
    listed = re.search(r"--(\[no\])?%s(?![\w-])" % re.escape(name),
                       help_output)
    if not listed:
      bad.append(arg)
      continue
    choices = re.search(r"--%s(?: \{([^}]*)\}|: <([^>]*)>)" % re.escape(name),
                        help_output)
    if has_value and choices:
      allowed = re.split(r"[,|]", choices.group(1) or choices.group(2))
      if value not in allowed:
        bad.append(f"{arg} (choices: {', '.join(allowed)})")
  return bad


def names_a_test(test: str) -> bool:
  path, _, name = test.partition("::")
  full = os.path.join(ROOT, path)
  if not os.path.isfile(full):
    return False
  with open(full) as f:
    return re.search(r"^def %s\(" % re.escape(name), f.read(), re.M) is not None


def ci_commands() -> list[Command]:
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    return extract_commands(f"```bash\n{f.read()}\n```", ".ci/run")


def paligemma_placeholders(command: Command) -> list[str]:
  """The PALIGEMMA_FILES placeholders among the command's flag values."""
  return [a.split("=", 1)[1] for a in command.argv
          if a.startswith("--") and a.split("=", 1)[-1] in PALIGEMMA_FILES]


def on_tiny_paligemma(command: Command, tiny, tmp_path) -> list[str]:
  """The command's arguments (after `python -m MODULE`) with the tiny
  model's files for the placeholders and fresh folders for the workdir and
  the output."""
  args = []
  for arg in command.argv[3:]:
    name, sep, value = arg.partition("=")
    if name in ("--workdir", "--output"):
      value = str(tmp_path / name[2:])
    elif value in PALIGEMMA_FILES:
      value = getattr(tiny, PALIGEMMA_FILES[value])
    args.append(name + sep + value)
  return args


COMMANDS = doc_commands()
# Each text once: docs repeat a command where it belongs.
PALIGEMMA_COMMANDS = list({
    c.text: c for c in reversed(COMMANDS) if paligemma_placeholders(c) and (
        runs_main(c) or python_program(c) == ["-m", "omnismola.convert"])
}.values())[::-1]


# --------------------------------------------------------------------- tests

@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_command_is_exercised(command, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)  # Docs' paths are relative to the checkout.
  how = coverage(command)
  assert how is not None, (
      f"{command.where}: `{command.text}` is not exercised by any test. Add "
      "a pattern for it to COVERED_BY in tests/test_docs_commands.py naming "
      "the test that runs it (or make it a command this file checks itself: "
      "python -m omnismola.main ..., or a python program with --help).")
  if how == "help":
    program = python_program(command)
    args = list(command.argv[1 + len(program):])
    bad = unknown_flags(args, help_text(tuple(program)))
    assert not bad, f"{command.where}: {' '.join(program)} rejects {bad}"
    error = config_error(args)
    assert error is None, f"{command.where}: `{command.text}`: {error}"
  elif how != "main":
    assert how == ".ci/run" or names_a_test(how), (
        f"{command.where}: COVERED_BY names {how}, which does not exist")
  args = main_args(command)
  if args is not None:
    error = parse_main_args(args, capsys, monkeypatch)
    assert error is None, f"{command.where}: `{command.text}`:\n{error}"


@pytest.mark.parametrize("pattern", sorted(COVERED_BY))
def test_covered_by_names_real_tests_and_live_commands(pattern):
  test = COVERED_BY[pattern]
  if test == ".ci/run":
    assert any(re.fullmatch(pattern, c.text) for c in ci_commands()), (
        f"{pattern!r} is mapped to .ci/run, which runs no such command")
  else:
    assert names_a_test(test), f"{test} does not exist"
  assert any(re.fullmatch(pattern, c.text) for c in COMMANDS), (
      f"COVERED_BY pattern {pattern!r} matches no command of the docs any "
      "more: remove it")


def test_the_docs_first_commands_are_found():
  texts = [c.text for c in COMMANDS if c.where.startswith("README.md")]
  assert "pip install -e ." in texts
  assert ("python -m omnismola.main --config=configs/mix.py "
          "--workdir=/tmp/omnismola_mix") in texts
  assert {"quickstart", "configuration"} <= {
      os.path.basename(c.where.split(":")[0])[:-3] for c in COMMANDS}


def test_extraction_joins_continuations_and_splits_chains():
  doc = "\n".join([
      "```bash", "# a comment",
      "python3 -m venv .venv && . .venv/bin/activate && pip install -e .",
      "python -m omnismola.main --config=configs/mix.py:rank=2 \\",
      "    --workdir=W \"--config.data.mixture=it's a mix\"", "```",
      "```console", "$ DRY_RUN=1 env -u X bash launch/gpu_slurm.sbatch \\",
      "    --config=c", "output line", "```",
      "```", "for i in 0 1; do", "  A=1 python -m m --id=$i &", "done",
      "```", "```python", "python = 1", "```"])
  commands = extract_commands(doc, "doc.md")
  assert [(c.where, c.env, c.argv) for c in commands] == [
      ("doc.md:3", (), ("python3", "-m", "venv", ".venv")),
      ("doc.md:3", (), ("pip", "install", "-e", ".")),
      ("doc.md:4", (), ("python", "-m", "omnismola.main",
                        "--config=configs/mix.py:rank=2", "--workdir=W",
                        "--config.data.mixture=it's a mix")),
      ("doc.md:8", ("DRY_RUN=1", "env", "-u", "X"),
       ("bash", "launch/gpu_slurm.sbatch", "--config=c")),
      ("doc.md:14", ("A=1",), ("python", "-m", "m", "--id=0")),
  ]


def test_an_unknown_command_or_a_bad_override_is_caught(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  (new,) = extract_commands("```bash\nsbatch other.sbatch\n```", "new.md")
  assert coverage(new) is None
  error = parse_main_args(["--config=configs/mix.py", "--workdir=W",
                           "--config.train.stpes=5"], capsys, monkeypatch)
  assert "'stpes'" in error
  error = parse_main_args(["--config=configs/mix.py", "--workdir=W",
                           "--config.train.steps=many"], capsys,
                          monkeypatch)
  assert error is not None
  assert unknown_flags(["--rank=4", "--experts=moe", "--rnak=2"],
                       "  --experts {none,lora,smola}\n  --rank RANK\n") == [
                           "--experts=moe (choices: none, lora, smola)",
                           "--rnak=2"]
  assert "'trian'" in config_error(["--config=configs/mix.py",
                                    "--config.trian.steps=5"])


def test_paligemma_commands_are_found():
  where = {c.where.split(":")[0] for c in PALIGEMMA_COMMANDS}
  assert {"README.md", "docs/configuration.md", "configs/vlmoe.py"} <= where
  texts = {c.text for c in PALIGEMMA_COMMANDS}
  assert not [c.text for c in COMMANDS
              if "/ckpt/" in c.text and c.text not in texts], (
                  "a /ckpt/ placeholder PALIGEMMA_FILES does not know")


@pytest.mark.parametrize(
    "command", [c for c in PALIGEMMA_COMMANDS if not runs_main(c)],
    ids=lambda c: c.where)
def test_paligemma_convert_command_runs(command, tiny_paligemma, tmp_path):
  """The conversion, from the tiny PaliGemma's files; the result loads."""
  from omnismola import pretrained  # pylint: disable=g-import-not-at-top
  args = on_tiny_paligemma(command, tiny_paligemma, tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "omnismola.convert", *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert pretrained.from_pretrained(str(tmp_path / "output"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [c for c in PALIGEMMA_COMMANDS if runs_main(c)],
    ids=lambda c: c.where)
def test_paligemma_main_command_runs(command, tiny_paligemma_3b,
                                     synthetic_data_dir, tmp_path,
                                     monkeypatch):
  """The run, from the tiny converted PaliGemma: a few steps, then the
  evaluation of one task (the mode the command names)."""
  monkeypatch.chdir(ROOT)
  args = [*on_tiny_paligemma(command, tiny_paligemma_3b, tmp_path),
          *RUN_OVERRIDES,
          f"--config.data.tfds_data_dir={synthetic_data_dir}"]
  with main_flags(args, monkeypatch) as main:
    monkeypatch.setattr(main, "initialize_distributed", lambda *_: None)
    main.main([])
  if not any(a.startswith("--mode=") and a != "--mode=train" for a in args):
    assert os.path.isdir(tmp_path / "workdir" / "checkpoints" / "2")
