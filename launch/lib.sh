# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). The caller sets
# PROG (its name, for messages) and DRY_RUN (0 or 1).

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell: words made of safe characters stay as
# they are (readable output); anything else goes in single quotes, with each
# ' written as '\'' (only the value of a --flag=value word is quoted). Used
# both for --dry-run output and to build command lines run elsewhere (on TPU
# workers), so what is printed is what is run.
quote() {
  local word=$1 q="'"
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    # --flag='value': the same word to the shell, easier to read.
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//$q/$q\\$q$q}"
  fi
}

# Quotes every argument and joins them with spaces.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command or, with DRY_RUN=1, prints it on one line, as it would run
# (the line can be pasted into a shell).
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    "$@"
  fi
}

# Like run_cmd, but replaces the shell with the command.
exec_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
    exit 0
  fi
  exec "$@"
}
