#!/usr/bin/env bash
# Prepare this checkout: a virtualenv with spoolq and its tools, plus the system packages
# the chosen task needs. Safe to run again: each step is skipped when already done.
#
#   scripts/bootstrap.sh run     the daemon's needs (Python packages)
#   scripts/bootstrap.sh test    + test tools, chromium (browser tests), ruby, ruby-nokogiri, curl (RQ's tests),
#                                xfsprogs and e2fsprogs (power-cut tests on loop-mounted images),
#                                postgresql (the PostgreSQL store's tests) when initdb is missing,
#                                fsq 0.2.5 for Python 2.7 where one exists (fsq's interop tests)
#   scripts/bootstrap.sh bench   + redis-server, postgresql and the peers benchmarked against
set -euo pipefail
mode=${1:-run}
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*" >&2; }

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "spoolq needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))"
  exit 1
fi

apt_updated=0
apt_install() {
  # Install Debian packages if missing; needs root or password-less sudo.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      say "cannot install ${missing[*]} (not root, no sudo): tests that need them will skip"
      return 0
    fi
  fi
  if [ $apt_updated -eq 0 ]; then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
    apt_updated=1
  fi
  say "installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || say "apt-get install ${missing[*]} failed: tests that need them will skip"
}

[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }

extras=""
case "$mode" in
  run) extras="" ;;
  test) extras="[dev]" ;;
  bench) extras="[dev,bench]" ;;
  *) say "unknown mode $mode (run, test, bench)"; exit 2 ;;
esac
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${mode}"
if [ ! -f "$stamp" ]; then
  say "installing spoolq${extras} into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
  touch "$stamp"
fi

fsq27() {
  # fsq 0.2.5 (seed 003) from PyPI, with its own bin/fsq and libexec/fsq tools, installed for
  # Python 2.7 into .venv/peers/fsq-0.2.5 (the interpreter's path in its file `python`):
  # tests/test_fsq_interop.py runs the original against spoolq. Without a python2.7 those
  # tests skip and say so.
  local dir=.venv/peers/fsq-0.2.5 py2=""
  [ -f "$dir/python" ] && return 0
  for c in python2.7 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7 /usr/bin/python2.7; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1; then
      py2=$(command -v "$c"); break
    fi
  done
  [ -n "$py2" ] || { say "no python2.7: fsq's own tools are not installed; their interop tests skip"; return 0; }
  say "installing fsq 0.2.5 for $py2 into $dir"
  rm -rf "$dir"
  if "$py2" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$dir" \
      "fsq==0.2.5" "jsonrpclib==0.1.7" >/dev/null 2>&1 && [ -f "$dir/bin/fsq" ]; then
    echo "$py2" > "$dir/python"
  else
    say "installing fsq 0.2.5 for Python 2.7 failed: its interop tests skip"
  fi
}

case "$mode" in
  test)
    fsq27
    # ruby, ruby-nokogiri, curl: RQ's own tests (tests/test_rq_setup.py); xfsprogs, e2fsprogs:
    # tests/test_powercut.py; netcat-openbsd: isq's producers and the notifier as their users
    # run them (tests/test_intake.py); lockfile-progs: isq's own lock (tests/test_isq.py)
    apt_install chromium ruby ruby-nokogiri curl xfsprogs e2fsprogs netcat-openbsd lockfile-progs
    # tests/pg_cluster.py starts its own PostgreSQL cluster from these binaries
    if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
      apt_install postgresql
    fi ;;
  bench)
    fsq27
    apt_install redis-server
    # bench/pg.py starts its own PostgreSQL cluster from these binaries
    if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
      apt_install postgresql
    fi ;;
esac
