r"""Re-measures the figures of docs/performance.md and the README, in one go.

Runs every CPU command shown in docs/performance.md's `bash` blocks and the
README's main command (command (a): the default run), one after the other
(never two at once: they would share the cores), and writes under OUT:

* `NN_<program>.log`: the command's whole output, after a header with the
  command, the machine (CPU model, cores), date, commit and load average;
* `summary.md`: one row per command: wall clock, peak RSS of its process
  tree's largest process, load average before and after, exit status.

The commands are read from the docs, not copied here, so what is measured
is what the pages show. Each `--workdir=` is replaced by a fresh folder
under OUT (a run never resumes an older one). Commands for an accelerator
(`benchmarks/gpu.sh` and the PaliGemma-3B suite it runs) and this script's
own are left out. A failing command is recorded and the
next one runs.

  python -m benchmarks.figures --out=/tmp/figures            # all of them
  python -m benchmarks.figures --out=/tmp/figures --list     # what it would run
  python -m benchmarks.figures --out=/tmp/figures --only=benchmarks.step
"""
import argparse
import datetime
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ("docs/performance.md",)
# The README's first bash block is command (a); its run is the one below.
MAIN_COMMAND = re.compile(r"python -m omnismola\.main .*")
# Left out: what only an accelerator runs (the GPU script and the 3B suite
# it wraps) and this script's own command.
LEFT_OUT = re.compile(
    r"benchmarks/gpu\.sh|--suite=paligemma_3b_224|benchmarks\.figures")


def bash_blocks(text: str) -> list[str]:
  """The bodies of the ```bash fenced blocks of a Markdown text."""
  return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def block_commands(block: str) -> list[str]:
  """One command per logical line: `\` continuations joined, comments and
  empty lines dropped."""
  joined = re.sub(r"\\\n\s*", "", block)
  commands = []
  for line in joined.splitlines():
    line = re.sub(r"\s+#.*$", "", line).strip()
    if line and not line.startswith("#"):
      commands.append(line)
  return commands


def documented_commands(root: pathlib.Path | None = None,
                        pages=PAGES) -> list[str]:
  """README's default run, then every CPU command of `pages`, in order,
  each once."""
  root = root or ROOT
  readme = bash_blocks((root / "README.md").read_text())[0]
  default_run = MAIN_COMMAND.search(readme)
  if default_run is None:
    raise ValueError("README.md's first bash block has no "
                     "`python -m omnismola.main` command.")
  commands = [default_run.group(0)]
  for page in pages:
    for block in bash_blocks((root / page).read_text()):
      for command in block_commands(block):
        if not LEFT_OUT.search(command) and command not in commands:
          commands.append(command)
  return commands


def program(command: str) -> str:
  """A short name for a command's log file: `omnismola.main`, `smola.py`."""
  words = [w for w in shlex.split(command) if "=" not in w.split("/")[0]]
  if "-m" in words:
    return words[words.index("-m") + 1]
  return next((os.path.basename(w) for w in words if w.endswith(".py")),
              words[0])


def with_fresh_workdir(command: str, workdir: pathlib.Path) -> str:
  return re.sub(r"--workdir=\S+", f"--workdir={workdir}", command)


def machine() -> str:
  model = "unknown CPU"
  if os.path.exists("/proc/cpuinfo"):
    found = re.search(r"^model name\s*:\s*(.*)$",
                      pathlib.Path("/proc/cpuinfo").read_text(), re.M)
    model = found.group(1) if found else model
  return f"{model}, {os.cpu_count()} cores, {platform.platform()}"


def commit() -> str:
  result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                         cwd=ROOT, capture_output=True, text=True, check=False)
  return (result.stdout.strip() or "unknown") + (
      " (with uncommitted changes)" if dirty.stdout.strip() else "")


def load_average() -> str:
  return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run_logged(command: str, log: pathlib.Path) -> dict:
  """Runs `command` in bash with its output to `log`; returns wall clock,
  peak RSS (the largest process of its tree, from wait4) and status."""
  load_before = load_average()
  header = (f"$ {command}\n# machine: {machine()}\n"
            f"# date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
            f"\n# commit: {commit()}\n# load average before: {load_before}\n")
  with open(log, "w") as out:
    out.write(header)
    out.flush()
    start = time.monotonic()
    # `python` in a command is this interpreter, venv or not.
    env = dict(os.environ, PATH=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    # wait4, not wait: it also gives the process tree's peak memory. Setting
    # returncode tells Popen the process was reaped.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    peak_rss_gb = usage.ru_maxrss / 2**20
    out.write(f"# exit status {process.returncode}, {wall:.1f} s wall, "
              f"peak RSS {peak_rss_gb:.2f} GB\n")
  return dict(wall=wall, peak_rss_gb=peak_rss_gb, load_before=load_before,
              load_after=load_average(), status=process.returncode)


def summary_row(index: int, command: str, result: dict) -> str:
  minutes, seconds = divmod(result["wall"], 60)
  return (f"| {index:02d} | `{command}` | {int(minutes)} min {seconds:.0f} s "
          f"| {result['peak_rss_gb']:.2f} GB | {result['load_before']} → "
          f"{result['load_after']} | {result['status']} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True,
                      help="folder for the logs, summary.md and workdirs")
  parser.add_argument("--only", default="",
                      help="run only the commands containing this text")
  parser.add_argument("--list", action="store_true",
                      help="print the commands and stop")
  args = parser.parse_args(argv)

  out = pathlib.Path(args.out).resolve()
  commands = [(i, c) for i, c in enumerate(documented_commands(), 1)
              if args.only in c]
  if not commands:
    parser.error(f"no documented command contains {args.only!r}")
  if args.list:
    for index, command in commands:
      print(f"{index:02d} {command}")
    return 0

  out.mkdir(parents=True, exist_ok=True)
  summary = out / "summary.md"
  summary.write_text(
      f"Machine: {machine()}\nCommit: {commit()}\n\n"
      "| # | command | wall | peak RSS | load average before → after "
      "| exit |\n|---|---|---|---|---|---|\n")
  failed = 0
  for index, command in commands:
    command = with_fresh_workdir(command, out / "runs" / f"{index:02d}")
    log = out / f"{index:02d}_{program(command)}.log"
    print(f"[{index:02d}/{len(commands)}] {command}  (log: {log})",
          flush=True)
    result = run_logged(command, log)
    failed += result["status"] != 0
    with open(summary, "a") as f:
      f.write(summary_row(index, command, result) + "\n")
  print(f"Wrote {summary}; {failed} command(s) failed.", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
