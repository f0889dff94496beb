#!/usr/bin/env bash
# Undo scripts/install.sh: stop and disable sockd (and its sockd@NAME instances), remove
# the virtual environment, /usr/local/bin/sockd and sockctl, the units, the sysusers.d and
# tmpfiles.d snippets, the docs and the logrotate file. Keeps the configuration
# (/etc/sockd) and the logs (/var/log/sockd) unless --purge. Idempotent.
#
# The sockd user and group are always kept, as Debian packages keep theirs: files
# elsewhere may still belong to them, and a reused uid would inherit those files.
# `userdel sockd` removes them once nothing does.
set -euo pipefail

readonly MARKER=".sockd-install"
readonly BINDIR=/usr/local/bin
readonly UNITDIR=/usr/local/lib/systemd/system
readonly UNITS=(sockd.service sockd.socket sockd@.service)

usage() {
  cat <<'EOF'
Usage: uninstall.sh [OPTIONS]

Stop and disable sockd, and remove what scripts/install.sh installed (run as root).
Keeps /etc/sockd (the configuration) and /var/log/sockd (the logs) unless --purge.

Options:
  --prefix DIR   the virtual environment to remove (default: where /usr/local/bin/sockd
                 points, else /opt/sockd); only a directory install.sh made is removed
  --purge        also remove /etc/sockd, /var/log/sockd and the drop-ins and overrides in
                 /etc/systemd/system (sockd.service.d/, ...)
  -h, --help     show this help
EOF
}

say() { printf 'uninstall.sh: %s\n' "$*"; }
die() {
  printf 'uninstall.sh: %s\n' "$1" >&2
  exit "${2:-1}"
}
usage_error() { die "$1 (see --help)" 2; }

prefix=""
purge=0
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --purge) purge=1 ;;
    --prefix)
      if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "--prefix needs a value"; fi
      prefix=$2
      shift
      ;;
    --prefix=*) prefix=${1#*=} ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift
done

if [ -z "$prefix" ]; then
  prefix=/opt/sockd
  if [ -L "$BINDIR/sockd" ]; then
    target=$(readlink -- "$BINDIR/sockd")
    case $target in
      /*/bin/sockd) prefix=${target%/bin/sockd} ;;
    esac
  fi
fi
case $prefix in
  /*) prefix=${prefix%/} ;;
  *) usage_error "--prefix must be an absolute path, not $prefix" ;;
esac

[ "$(id -u)" = 0 ] || die "must run as root (sudo $0 ...): it removes a system service"

# --- 1. Stop and disable, while the units are still there -----------------------------------
systemd=0
[ -d /run/systemd/system ] && systemd=1
if [ "$systemd" = 1 ]; then
  # Instances first: every loaded sockd@NAME, and every enabled one (a link in a .wants/).
  instances=()
  while read -r unit _; do
    instances+=("$unit")
  done < <(
    systemctl list-units --all --plain --no-legend 'sockd@*.service'
    find /etc/systemd/system -path '*.wants/sockd@*.service' -printf '%f\n' 2>/dev/null
  )
  for unit in "${instances[@]}" sockd.socket sockd.service; do
    # A unit that is not loaded or not enabled is fine: this may run twice.
    systemctl --quiet disable --now "$unit" 2>/dev/null || systemctl --quiet stop "$unit" 2>/dev/null || true
  done
fi

# --- 2. Remove what install.sh installed -------------------------------------------------
for command in sockd sockctl; do
  link=$BINDIR/$command
  if [ -L "$link" ] && [ "$(readlink -- "$link")" = "$prefix/bin/$command" ]; then
    rm -f -- "$link"
  elif [ -e "$link" ] || [ -L "$link" ]; then
    say "kept $link: it does not point into $prefix"
  fi
done
for unit in "${UNITS[@]}"; do
  rm -f -- "$UNITDIR/$unit"
done
rm -f -- /usr/local/lib/sysusers.d/sockd.conf /usr/local/lib/tmpfiles.d/sockd.conf \
  /etc/logrotate.d/sockd
rm -rf -- /usr/local/share/doc/sockd
if [ -e "$prefix/$MARKER" ]; then
  rm -rf -- "$prefix"
  say "removed $prefix"
elif [ -e "$prefix" ]; then
  say "kept $prefix: install.sh did not make it (no $MARKER)"
fi

if [ "$purge" = 1 ]; then
  rm -rf -- /etc/sockd /var/log/sockd
  for unit in "${UNITS[@]}"; do
    rm -rf -- "/etc/systemd/system/$unit" "/etc/systemd/system/$unit.d"
  done
  say "purged /etc/sockd, /var/log/sockd and sockd's overrides in /etc/systemd/system"
else
  for unit in "${UNITS[@]}"; do
    if [ -e "/etc/systemd/system/$unit" ]; then
      say "kept /etc/systemd/system/$unit (yours, not install.sh's; --purge removes it)"
    fi
  done
  say "kept /etc/sockd and /var/log/sockd (--purge removes them)"
fi

if [ "$systemd" = 1 ]; then
  systemctl daemon-reload
  systemctl reset-failed 'sockd*' 2>/dev/null || true
fi
say "sockd is uninstalled (the sockd user stays; userdel sockd removes it)"
