#!/usr/bin/env bash
# Make (or repair) .venv and install sockd into it, editable; idempotent.
# Usage: scripts/venv.sh [EXTRAS]   (scripts/test.sh passes "test")
#
# The README's quick start and scripts/test.sh both come here, so whichever runs first
# makes a venv the other can use. The systemd tests run the venv inside a container with
# ProtectHome=: its interpreter must not live under /root or /home, so the distribution's
# Python is preferred, and a venv made from another one (a pyenv Python under /root) is
# remade from it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=python3
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  PY=/usr/bin/python3
fi
if [ -x .venv/bin/python ] && [ "$PY" = /usr/bin/python3 ]; then
  base=$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')
  if [ "$base" != /usr ]; then
    echo "venv.sh: .venv was made from the Python in $base; remaking it from /usr/bin/python3" >&2
    rm -rf .venv
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
spec=.
[ -n "${1:-}" ] && spec=".[$1]"
.venv/bin/pip install -q --disable-pip-version-check -e "$spec"
