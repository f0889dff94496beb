"""Test payload: a tiny Type=notify service speaking through sockd.systemd, run inside a box.

Not a test module. Units in tests/systemd start it as
``.venv/bin/python tests/systemd/notify_payload.py [options]``. It prints what it does (the
tests read that from the journal), says READY=1, then waits for signals -- no sleeping:
SIGHUP reloads (RELOADING=1 ... READY=1), SIGTERM stops (STOPPING=1, exit 0).

Options exercise the rest of the module against a real systemd and journald:
``--journal`` writes a native journal entry, ``--listen HOST:PORT`` takes its listening
socket from LISTEN_FDS if systemd passed one, else binds it and puts it in the fd store.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from sockd import systemd


def say(text: str) -> None:
    print(f"payload: {text}", flush=True)


def listener(address: str, notifier: systemd.Notifier) -> socket.socket:
    host, _, port = address.rpartition(":")
    inherited = systemd.listen_fds()
    say("inherited " + " ".join(f"{s.name}={s.address[1]}" for s in inherited))
    found = systemd.find_inherited(inherited, host, int(port))
    if found is not None:
        say(f"serving inherited {found.name} port {found.address[1]}")
        return found.socket
    sock = socket.create_server((host, int(port)))
    stored = notifier.store_fds("listen", [sock.fileno()])
    say(f"bound port {sock.getsockname()[1]} stored={stored}")
    return sock


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--journal", action="store_true")
    parser.add_argument("--listen")
    args = parser.parse_args()

    # Block the signals first so none is lost between READY=1 and sigwait().
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
    notifier = systemd.Notifier(on_error=lambda message: say(f"notify error: {message}"))
    say(f"starting watchdog={systemd.watchdog_interval()}")
    keep = listener(args.listen, notifier) if args.listen else None
    if args.journal:
        systemd.JournalWriter(identifier="notify-payload").send(
            {
                "MESSAGE": "payload journal entry",
                "PRIORITY": "6",
                "sockd_event": "payload.ready",
                "sockd_detail": "first line\nsecond line",
            }
        )
    # The module-level helper, as the smoke test's brief asks for.
    if not systemd.notify("READY=1", "STATUS=waiting for signals"):
        say(f"READY=1 not sent: {notifier.last_error or 'NOTIFY_SOCKET unset'}")
        return 1
    say("ready")
    notifier.watchdog()
    while True:
        received = signal.sigwait({signal.SIGTERM, signal.SIGHUP})
        if received == signal.SIGHUP:
            notifier.reloading("reloading")
            say("reloaded")
            notifier.ready("reloaded")
            continue
        notifier.stopping()
        say("stopping")
        if keep is not None:
            keep.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
