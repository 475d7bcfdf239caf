#!/usr/bin/env bash
# Creates a Cloud TPU VM slice, installs omnismola on every worker, runs the
# same `python -m omnismola.main ...` command on all of them, follows the logs
# and deletes the slice. See docs/launch.md.
#
#   launch/tpu_vm.sh [OPTIONS] COMMAND [OPTIONS] [-- ARGS FOR omnismola.main]
#
# Commands:
#   create   gcloud compute tpus tpu-vm create (needs accelerator and version)
#   install  copies this checkout (or clones --repo-url) to every worker, then
#            pip install -e . together with jax[tpu] on every worker
#   run      starts `python3 -m omnismola.main ARGS` in the background on every
#            worker (nohup); each worker writes its own log
#   logs     follows the log of one worker (--worker, default 0)
#   stop     stops the run started by `run` on every worker
#   delete   deletes the slice (gcloud asks first unless --yes)
#
# Options (each has an environment variable; the flag wins):
#   --name=NAME          TPU_NAME         the slice's name (always required)
#   --zone=ZONE          TPU_ZONE         e.g. us-central2-b (always required)
#   --project=PROJECT    TPU_PROJECT      default: gcloud's configured project
#   --accelerator=TYPE   TPU_ACCELERATOR  e.g. v4-32 (required by create)
#   --version=VERSION    TPU_VERSION      TPU software version, e.g.
#                                         tpu-ubuntu2204-base (required by create)
#   --spot               TPU_SPOT=1       create a Spot slice
#   --worker=N           TPU_WORKER       worker whose log `logs` follows (0)
#   --repo-url=URL       OMNISMOLA_REPO_URL  install: git clone URL instead of
#                                         copying this checkout
#   --ref=REF            OMNISMOLA_REF    install from --repo-url: what to check
#                                         out (origin/HEAD)
#   --remote-dir=DIR     TPU_REMOTE_DIR   checkout on the workers, relative to
#                                         the home directory (omnismola)
#   --python=PYTHON      TPU_PYTHON       interpreter on the workers (python3)
#   --jax=SPEC           TPU_JAX          pip requirement for JAX ('jax[tpu]')
#   --log=FILE           TPU_LOG          log on each worker, relative to the
#                                         home directory (omnismola.log)
#   --env=KEY=VALUE      (repeatable)     environment for `run`, e.g.
#                                         --env=LIBTPU_INIT_ARGS=...
#   --yes                                 delete without asking
#   --dry-run            DRY_RUN=1        print every command, one a line,
#                                         exactly as it would run; run nothing
#   -h, --help
set -euo pipefail

readonly PROG=${0##*/}
# The repository root: install copies it, whatever the caller's directory.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO

usage() {
  # The header comment above is the help text.
  sed -n '2,/^set -euo pipefail$/{/^set /d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
}

# die, quote, quote_cmd, run_cmd.
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

# ---------------------------------------------------------------- settings
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR:-}
VERSION=${TPU_VERSION:-}
SPOT=${TPU_SPOT:-0}
WORKER=${TPU_WORKER:-0}
REPO_URL=${OMNISMOLA_REPO_URL:-}
REF=${OMNISMOLA_REF:-origin/HEAD}
REMOTE_DIR=${TPU_REMOTE_DIR:-omnismola}
PYTHON=${TPU_PYTHON:-python3}
JAX=${TPU_JAX:-jax[tpu]}
LOG=${TPU_LOG:-omnismola.log}
DRY_RUN=${DRY_RUN:-0}
YES=0
RUN_ENV=()
COMMAND=""
MAIN_ARGS=()

# Options may stand before or after the command; everything after `--` goes
# to omnismola.main untouched. Both --opt=value and --opt value are accepted.
while (($#)); do
  arg=$1
  shift
  case $arg in
    --) MAIN_ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; continue ;;
    --spot) SPOT=1; continue ;;
    --yes) YES=1; continue ;;
    --*=*) opt=${arg%%=*}; value=${arg#*=} ;;
    --*)
      opt=$arg
      (($#)) || die "$opt needs a value"
      value=$1
      shift
      ;;
    -*) die "unknown option $arg (see $PROG --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$arg')"
      COMMAND=$arg
      continue
      ;;
  esac
  case $opt in
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator) ACCELERATOR=$value ;;
    --version) VERSION=$value ;;
    --worker) WORKER=$value ;;
    --repo-url) REPO_URL=$value ;;
    --ref) REF=$value ;;
    --remote-dir) REMOTE_DIR=$value ;;
    --python) PYTHON=$value ;;
    --jax) JAX=$value ;;
    --log) LOG=$value ;;
    --env)
      [[ $value == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$value'"
      RUN_ENV+=("$value")
      ;;
    *) die "unknown option $opt (see $PROG --help)" ;;
  esac
done

[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
[[ $SPOT == 0 || $SPOT == 1 ]] || die "TPU_SPOT must be 0 or 1, got '$SPOT'"
case $COMMAND in
  create | install | run | logs | stop | delete) ;;
  "") die "no command given: create, install, run, logs, stop or delete (see $PROG --help)" ;;
  *) die "unknown command '$COMMAND': create, install, run, logs, stop or delete" ;;
esac
if ((${#MAIN_ARGS[@]})) && [[ $COMMAND != run ]]; then
  die "arguments after -- are for 'run' only"
fi

# Every missing required setting is reported at once, with how to give it.
missing=()
require() {  # require VALUE FLAG ENVVAR
  [[ -n $1 ]] || missing+=("$2 (or \$$3)")
}
require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
if [[ $COMMAND == create ]]; then
  require "$ACCELERATOR" --accelerator TPU_ACCELERATOR
  require "$VERSION" --version TPU_VERSION
fi
if ((${#missing[@]})); then
  die "'$COMMAND' needs $(printf '%s, ' "${missing[@]}" | sed 's/, $//')"
fi
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$WORKER'"

if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
fi

# Flags every gcloud call on this slice carries.
LOCATION=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")

# Runs one shell command line on the workers (all, or one number).
ssh_workers() {  # ssh_workers WORKER COMMAND_LINE
  run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" \
    --worker="$1" --command="$2"
}

# The run's process id sits beside its log on each worker.
PID_FILE=${LOG%.log}.pid
q_dir=$(quote "$REMOTE_DIR")
q_log=$(quote "$LOG")
q_pid=$(quote "$PID_FILE")
# True on a worker whose earlier run is still alive.
is_running="[ -f $q_pid ] && kill -0 \"\$(cat $q_pid)\" 2>/dev/null"

# ---------------------------------------------------------------- commands
case $COMMAND in
  create)
    args=(--accelerator-type="$ACCELERATOR" --version="$VERSION")
    [[ $SPOT == 0 ]] || args+=(--spot)
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" "${args[@]}"
    ;;

  install)
    if [[ -n $REPO_URL ]]; then
      # A clone per worker: fetch again when it is already there, so that
      # install also updates.
      fetch="if [ -d $q_dir/.git ]; then git -C $q_dir fetch --quiet origin;"
      fetch+=" else git clone --quiet $(quote "$REPO_URL") $q_dir; fi"
      fetch+=" && git -C $q_dir checkout --quiet --detach $(quote "$REF")"
    else
      # Copy this checkout as it is (uncommitted edits included): one tarball
      # without VCS data, caches, build outputs and virtual environments,
      # unpacked over the workers' copy.
      tarball=${TMPDIR:-/tmp}/omnismola-$NAME.tar.gz
      remote_tarball=omnismola-src.tar.gz
      run_cmd tar -czf "$tarball" --exclude-vcs --exclude-vcs-ignores \
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=.venv \
        --exclude=.pytest_cache --exclude=./build --exclude=./dist \
        --exclude=./workdirs --exclude=./.whl -C "$REPO" .
      run_cmd gcloud compute tpus tpu-vm scp "$tarball" \
        "$NAME:$remote_tarball" "${LOCATION[@]}" --worker=all
      run_cmd rm -f "$tarball"
      fetch="mkdir -p $q_dir && tar -xzf $remote_tarball -C $q_dir"
      fetch+=" && rm -f $remote_tarball"
    fi
    # jax[tpu] beside the package: setup.py asks for plain jax, which has no
    # TPU backend (libtpu).
    ssh_workers all "$fetch && cd $q_dir && $(quote_cmd "$PYTHON" -m pip install -e . "$JAX")"
    ;;

  run)
    # Caught here rather than in a background log on every worker.
    has_config=0 has_workdir=0 workdir=""
    for ((i = 0; i < ${#MAIN_ARGS[@]}; i++)); do
      case ${MAIN_ARGS[i]} in
        --config=* | -config=*) has_config=1 ;;
        --config | -config) has_config=1 ;;
        --workdir=* | -workdir=*) has_workdir=1; workdir=${MAIN_ARGS[i]#*=} ;;
        --workdir | -workdir) has_workdir=1; workdir=${MAIN_ARGS[i + 1]:-} ;;
      esac
    done
    ((has_config && has_workdir)) ||
      die "'run' needs the omnismola.main arguments after --, at least" \
        "--config=... and --workdir=..., e.g." \
        "-- --config=configs/mix.py --workdir=gs://BUCKET/run"
    # Every worker writes checkpoints and metrics to the workdir: on a slice
    # of several workers it has to be shared storage.
    [[ $workdir == gs://* ]] ||
      echo "$PROG: warning: --workdir=$workdir is not on gs://; every worker" \
        "of a multi-worker slice needs the same shared workdir" >&2
    main=("$PYTHON" -m omnismola.main "${MAIN_ARGS[@]}")
    ((${#RUN_ENV[@]} == 0)) || main=(env "${RUN_ENV[@]}" "${main[@]}")
    # The TPU chips serve one process: refuse to start a second run. nohup
    # and the redirections let the run outlive the ssh session; stdin from
    # /dev/null keeps ssh from waiting on it.
    remote="if $is_running; then echo \"\$(hostname): omnismola is already"
    remote+=" running (pid \$(cat $q_pid)); use: $PROG stop\" >&2; exit 1; fi"
    remote+="; (cd $q_dir && exec nohup $(quote_cmd "${main[@]}")) > $q_log 2>&1 < /dev/null &"
    remote+=" echo \$! > $q_pid; echo \"\$(hostname): started pid \$!, log $q_log\""
    ssh_workers all "$remote"
    ;;

  logs)
    # tail -F keeps following across a restarted run; Ctrl-C ends it.
    ssh_workers "$WORKER" "tail -n 100 -F $q_log"
    ;;

  stop)
    stop="if $is_running; then kill \"\$(cat $q_pid)\""
    stop+=" && echo \"\$(hostname): stopped pid \$(cat $q_pid)\";"
    stop+=" else echo \"\$(hostname): not running\"; fi"
    ssh_workers all "$stop"
    ;;

  delete)
    # --quiet skips gcloud's confirmation prompt, so only with --yes.
    if [[ $YES == 1 ]]; then
      run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
    else
      run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}"
    fi
    ;;
esac
