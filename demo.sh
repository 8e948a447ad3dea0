#!/usr/bin/env bash
# The after-response demo, on a fresh machine: ./demo.sh [--logins N] [--rate R] [--quick]
#
# Creates .venv-demo (python3 -m venv), installs this project with its `demo` extra, then runs
# `python -m examples.demo`: a login app under uvicorn with a local SMTP server, measured with
# the email awaited and with the email left to after-response (see examples/demo.py).
# Needs Python 3.10+ with venv (Debian/Ubuntu: apt-get install python3-venv). Later runs reuse
# the virtualenv and reinstall only when pyproject.toml has changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
VENV=.venv-demo

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "demo.sh: $PYTHON not found; install Python 3.10 or later (or set PYTHON=...)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "demo.sh: after-response needs Python 3.10 or later; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  if ! "$PYTHON" -m venv "$VENV"; then
    rm -rf "$VENV"
    # Debian and Ubuntu ship venv apart from python3; install it when we are allowed to.
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "== installing python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv "$VENV"
    else
      echo "demo.sh: '$PYTHON -m venv' failed; install venv (Debian/Ubuntu: sudo apt-get install python3-venv) and run ./demo.sh again" >&2
      exit 1
    fi
  fi
fi

# Install (again) only when pyproject.toml changed since the last install.
stamp="$VENV/.installed-$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()[:16])')"
if [ ! -e "$stamp" ]; then
  echo "== installing after-response[demo] into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[demo]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

echo "== running the demo"
exec "$VENV/bin/python" -m examples.demo "$@"
