#!/usr/bin/env bash
# Install sockd as a system service from this checkout (or an unpacked sdist), or from a
# built wheel, then enable and start it. Idempotent: run it again to upgrade (a running
# sockd is restarted; its listening sockets wait in systemd's fd store meanwhile).
#
# Where things go, and why:
#   PREFIX (/opt/sockd)          a virtual environment: pip cannot install into Debian's
#                                Python (PEP 668), and FHS puts self-contained add-on
#                                software in /opt/<package>. Not under /root or /home: the
#                                unit's ProtectHome= hides those.
#   /usr/local/bin/sockd,sockctl symbolic links into PREFIX/bin: the paths the units and
#                                the logrotate file name, and sockctl on every PATH.
#   /usr/local/lib/systemd/system/      sockd.service, sockd.socket, sockd@.service
#   /usr/local/lib/sysusers.d/sockd.conf the sockd user and group
#   /usr/local/lib/tmpfiles.d/sockd.conf /etc/sockd
#   /usr/local/share/doc/sockd/  README, docs/, the example config (Documentation=)
#       /usr/local is where systemd looks for units and snippets installed by the local
#       administrator outside the package manager; /etc/systemd/system stays theirs for
#       overrides (`systemctl edit sockd`), and uninstall.sh never deletes an edit there.
#   /etc/sockd/sockd.toml        the example config, only if no config is there yet
#   /etc/logrotate.d/sockd       log rotation (logrotate reads only /etc/logrotate.d)
set -euo pipefail
# Whatever root's umask: the sockd user must read the virtual environment, and operators
# the docs and links (a 077 umask would make the service fail to import sockd).
umask 022

readonly MARKER=".sockd-install"
readonly BINDIR=/usr/local/bin
readonly UNITDIR=/usr/local/lib/systemd/system
readonly SYSUSERS=/usr/local/lib/sysusers.d/sockd.conf
readonly TMPFILES=/usr/local/lib/tmpfiles.d/sockd.conf
readonly DOCDIR=/usr/local/share/doc/sockd
readonly CONFIG=/etc/sockd/sockd.toml
readonly LOGROTATE=/etc/logrotate.d/sockd

usage() {
  cat <<'EOF'
Usage: install.sh [OPTIONS]

Install sockd as a systemd service (run as root): a virtual environment in PREFIX,
/usr/local/bin/sockd and sockctl, the units, the sockd user, /etc/sockd/sockd.toml
(kept if it exists), log rotation; then check the config and enable and start
sockd.service. Run it again to upgrade. scripts/uninstall.sh undoes it.

Options:
  --prefix DIR       where the virtual environment goes (default /opt/sockd)
  --wheel FILE       install this built wheel instead of building this checkout
  --python PATH      the Python 3.11+ to make the environment with (default python3)
  --no-enable        install only: do not enable or start sockd.service (a running
                     sockd is still restarted, so an upgrade takes effect)
  --find-links DIR   look for packages in DIR too (pip's --find-links; repeatable)
  --no-index         do not use PyPI (pip's --no-index), e.g. offline with a wheelhouse
                     made elsewhere by: pip wheel -w wheelhouse . 'setuptools>=77.0.3'
  -h, --help         show this help

Exit status: 0 installed (and running, unless --no-enable), 1 failure, 2 usage,
78 the config in /etc/sockd/sockd.toml is invalid (installed, not started).
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() {
  printf 'install.sh: %s\n' "$1" >&2
  exit "${2:-1}"
}
usage_error() { die "$1 (see --help)" 2; }

prefix=/opt/sockd
wheel=""
python=python3
enable=1
pip_options=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --no-enable) enable=0 ;;
    --no-index) pip_options+=(--no-index) ;;
    --prefix | --wheel | --python | --find-links)
      if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi
      case $1 in
        --prefix) prefix=$2 ;;
        --wheel) wheel=$2 ;;
        --python) python=$2 ;;
        --find-links) pip_options+=(--find-links "$2") ;;
      esac
      shift
      ;;
    --prefix=* | --wheel=* | --python=* | --find-links=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue
      ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift
done

source_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$source_dir/packaging/systemd/sockd.service" ] ||
  die "$source_dir has no packaging/systemd/sockd.service: run the install.sh of a sockd checkout or sdist"

case $prefix in
  /*) ;;
  *) usage_error "--prefix must be an absolute path, not $prefix" ;;
esac
prefix=${prefix%/}
case $prefix/ in
  /home/* | /root/* | /run/user/* | /tmp/* | /var/tmp/*)
    usage_error "--prefix $prefix is hidden from the hardened unit (ProtectHome=/PrivateTmp=); use e.g. /opt/sockd"
    ;;
  / | /usr/ | /usr/local/ | /opt/ | /etc/ | /var/ | /srv/ | /bin/ | /lib/ | /sbin/)
    usage_error "--prefix $prefix is a system directory; use a directory of its own, e.g. /opt/sockd"
    ;;
esac
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] || die "--wheel $wheel: no such file"
  case $wheel in
    *.whl) ;;
    *) usage_error "--wheel $wheel is not a .whl file" ;;
  esac
  wheel=$(realpath -- "$wheel")
fi

[ "$(id -u)" = 0 ] || die "must run as root (sudo $0 ...): it installs a system service"

# Nothing is changed before these checks pass.
for command in sockd sockctl; do
  link=$BINDIR/$command
  if [ -e "$link" ] || [ -L "$link" ]; then
    if [ ! -L "$link" ] || [ "$(readlink -- "$link")" != "$prefix/bin/$command" ]; then
      die "$link exists and is not a link to $prefix/bin/$command; remove it (an older sockd?) and run again"
    fi
  fi
done
if [ -e "$prefix" ] && [ ! -e "$prefix/$MARKER" ] && [ -n "$(ls -A -- "$prefix")" ]; then
  die "$prefix exists and was not made by install.sh; choose another --prefix or remove it"
fi

# --- 1. The virtual environment ------------------------------------------------------------
if [ -x "$prefix/bin/python" ] && "$prefix/bin/python" -c '' 2>/dev/null; then
  say "reusing the virtual environment in $prefix"
else
  command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python 3.11 or later, or pass --python"
  python_version=$("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null) ||
    die "$python does not run as Python; pass --python PATH of a Python 3.11 or later"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is Python $python_version; sockd needs 3.11 or later (--python)"
  say "creating a virtual environment in $prefix"
  # --clear: a venv whose Python is gone (e.g. a distribution upgrade) is made anew.
  if ! venv_error=$("$python" -m venv --clear "$prefix" 2>&1); then
    [ -e "$prefix/$MARKER" ] || rm -rf -- "$prefix"
    printf '%s\n' "$venv_error" >&2
    die "$python -m venv failed; on Debian or Ubuntu: apt-get install python3-venv"
  fi
fi
echo "Made by the install.sh of sockd; its uninstall.sh removes this directory." >"$prefix/$MARKER"

workdir=$(mktemp -d)
trap 'rm -rf -- "$workdir"' EXIT
if [ -n "$wheel" ]; then
  target=$wheel
else
  # Build from a copy: pip builds in the source tree, which would leave root-owned build/
  # and *.egg-info in the checkout (or fail on a read-only one).
  [ -f "$source_dir/pyproject.toml" ] || die "$source_dir has no pyproject.toml: pass --wheel FILE"
  mkdir "$workdir/src"
  tar -C "$source_dir" -cf - --exclude=__pycache__ pyproject.toml README.md LICENSE sockd sockctl |
    tar -C "$workdir/src" -xf -
  target=$workdir/src
fi
say "installing sockd into $prefix from ${wheel:-$source_dir}"
pip_install() {
  "$prefix/bin/pip" install --quiet --disable-pip-version-check --no-warn-script-location \
    "${pip_options[@]}" "$@" ||
    die "pip install failed (offline? make a wheelhouse and pass --no-index --find-links DIR)"
}
pip_install "$target"
if [ -n "$wheel" ]; then
  # pip skips a wheel whose version is installed already, but the same version number may
  # carry new code (a directory is always rebuilt and reinstalled).
  pip_install --force-reinstall --no-deps "$target"
fi
version=$("$prefix/bin/sockd" --version) || die "$prefix/bin/sockd does not run"

# --- 2. Commands on PATH, where the units and logrotate file expect them ----------------------
mkdir -p -- "$BINDIR"
for command in sockd sockctl; do
  ln -sfn -- "$prefix/bin/$command" "$BINDIR/$command"
done

# --- 3. Units, user, directories, config, log rotation, docs -------------------------------
install -D -m 0644 -t "$UNITDIR" "$source_dir"/packaging/systemd/sockd.service \
  "$source_dir"/packaging/systemd/sockd.socket "$source_dir"/packaging/systemd/sockd@.service
# install -D: /usr/local/lib/sysusers.d and tmpfiles.d do not exist on a stock system.
install -D -m 0644 "$source_dir/packaging/sysusers.d/sockd.conf" "$SYSUSERS"
install -D -m 0644 "$source_dir/packaging/tmpfiles.d/sockd.conf" "$TMPFILES"
if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers "$SYSUSERS"
elif ! getent passwd sockd >/dev/null; then
  # The same account sysusers.d/sockd.conf describes, on a system without systemd-sysusers.
  useradd --system --user-group --home-dir / --no-create-home --shell /usr/sbin/nologin \
    --comment "sockd socketserver daemon" sockd
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
  systemd-tmpfiles --create "$TMPFILES"
else
  install -d -m 0755 /etc/sockd
fi
if [ -e "$CONFIG" ] || [ -L "$CONFIG" ]; then
  say "kept $CONFIG (the example is in $DOCDIR/etc/sockd.toml)"
else
  install -m 0644 "$source_dir/etc/sockd.toml" "$CONFIG"
  say "installed the example config as $CONFIG"
fi
install -D -m 0644 "$source_dir/etc/logrotate.d/sockd" "$LOGROTATE"
install -D -m 0644 -t "$DOCDIR" "$source_dir/README.md" "$source_dir/LICENSE"
install -D -m 0644 -t "$DOCDIR/docs" "$source_dir"/docs/*.md
install -D -m 0644 -t "$DOCDIR/etc" "$source_dir/etc/sockd.toml"
for unit in sockd.service sockd.socket sockd@.service; do
  if [ -e "/etc/systemd/system/$unit" ]; then
    say "warning: /etc/systemd/system/$unit overrides the installed $UNITDIR/$unit (an earlier manual install, or systemctl edit --full); remove it to use the new one"
  fi
done
say "installed $version: $BINDIR/sockd -> $prefix/bin/sockd, units in $UNITDIR"

# --- 4. Check the config, then hand over to systemd -----------------------------------------
set +e
check=$(cd / && "$BINDIR/sockd" --config "$CONFIG" --check-config 2>&1)
status=$?
set -e
if [ "$status" -ne 0 ]; then
  printf '%s\n' "$check" >&2
  die "$CONFIG is not valid (exit $status): fix it, then systemctl enable --now sockd" "$status"
fi

if [ ! -d /run/systemd/system ]; then
  say "systemd is not running here: start sockd with sockd --daemon --pidfile PATH (see the README)"
  exit 0
fi
systemctl daemon-reload
was_active=0
systemctl --quiet is-active sockd.service && was_active=1
if [ "$enable" = 1 ]; then
  systemctl --quiet enable sockd.service
fi
if [ "$was_active" = 1 ]; then
  say "restarting sockd.service on the new code"
  systemctl restart sockd.service
elif [ "$enable" = 1 ]; then
  systemctl start sockd.service ||
    die "sockd.service did not start; see systemctl status sockd and journalctl -u sockd"
fi
# Template instances that run (sockd@NAME) move to the new code too; none is started.
systemctl try-restart 'sockd@*.service'
if [ "$enable" = 1 ]; then
  systemctl --quiet is-active sockd.service ||
    die "sockd.service is not active; see systemctl status sockd and journalctl -u sockd"
  say "sockd.service is enabled and running: systemctl status sockd, sockctl status"
else
  say "not enabled (--no-enable): systemctl enable --now sockd starts it"
fi
