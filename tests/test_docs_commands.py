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
"""
import dataclasses
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs",
                                                             "*.md")))

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


def parse_main_args(args: list[str], capsys, monkeypatch) -> str | None:
  """main.py's own flag parsing of `args`; the error it prints, or None."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from omnismola import main  # pylint: disable=g-import-not-at-top
  argv = ["omnismola.main", *args]
  # ml_collections reads the --config.x overrides from sys.argv.
  monkeypatch.setattr(sys, "argv", argv)
  try:
    main.parse_flags(argv)
  except SystemExit:
    return capsys.readouterr().err.strip() or "exited"
  finally:
    # Back to unparsed, without the override flags this config defined
    # (the next command's config defines its own).
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
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


COMMANDS = doc_commands()


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
