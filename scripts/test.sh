#!/usr/bin/env bash
# Install everything the test suite needs (idempotent), then run linters, type checks
# and every test. Used by .ci/run and by developers alike; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# .venv with the distribution's Python (the systemd tests need it) and the test extras.
./scripts/venv.sh test

# System tools some tests drive: systemd-nspawn (real systemd), curl (control API as
# documented), logrotate (run inside the systemd box, which shares the host's /usr),
# setpriv/nsenter (util-linux: tests acting as other users), groupadd/useradd (passwd)
# and the linter of install.sh and uninstall.sh (a test runs it).
# Installed only where we are root with apt; tests skip with a reason otherwise.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  need=""
  command -v systemd-nspawn >/dev/null 2>&1 || need="$need systemd-container"
  command -v curl >/dev/null 2>&1 || need="$need curl"
  command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || need="$need logrotate"
  command -v setpriv >/dev/null 2>&1 || need="$need util-linux"
  command -v useradd >/dev/null 2>&1 || [ -x /usr/sbin/useradd ] || need="$need passwd"
  command -v shellcheck >/dev/null 2>&1 || need="$need shellcheck"
  if [ -n "$need" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
  fi
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
