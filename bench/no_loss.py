"""No data lost: clients exchange numbered messages through reloads and a SIGTERM.

Many client threads send numbered lines to sockd (``tests.handlers:LineEcho``, which
at a drain answers every line already sent and then closes at a request boundary),
half on fresh connections, half on persistent ones, while sockd is reloaded with
SIGHUP every ``--reload-every`` seconds and finally stopped with SIGTERM. Every request
must end one of two ways:
- completed: the exact reply arrived in full;
- refused cleanly: the connection was refused, or closed (EOF) before any byte of the
  reply (a line that reached sockd only after the handler closed at a boundary).
A partial or wrong reply is a loss, and so is a reset after the request was sent: the
client cannot tell whether its request ran (a connection accepted by the kernel and
reset when the listening socket closed at the stop looked exactly like that). The
script also checks the daemon's own accounting: the bytes sockd says it sent (sum of
``conn.close`` ``bytes_out``) must equal the bytes the clients received. Prints the
counts; exits 1 on any loss.

    .venv/bin/python bench/no_loss.py [--mode threading|forking] [--seconds 10] [--clients 16]

Only loopback; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    completed: int = 0
    completed_fresh: int = 0  # on a connection made for this one request
    refused_clean: int = 0
    reset_after_request: int = 0
    half: int = 0
    wrong: int = 0
    received_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


def _client(
    address: tuple[str, int], worker: int, persistent: bool, tally: Tally, stop: threading.Event
) -> None:
    n = 0
    sock: socket.socket | None = None
    while not stop.is_set():
        n += 1
        payload = f"w{worker}-{n:09d}\n".encode()
        try:
            if sock is None:
                sock = socket.create_connection(address, timeout=30)
        except OSError:
            tally.add(refused_clean=1)
            if stop.wait(0.005):  # pacing reconnect attempts while refused
                break
            continue
        got = b""
        sent = reset = False
        try:
            sock.sendall(payload)
            sent = True
            while len(got) < len(payload):
                chunk = sock.recv(len(payload) - len(got))
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:
            reset = sent
        except OSError:
            pass
        tally.add(received_bytes=len(got))
        if got == payload:
            tally.add(completed=1, completed_fresh=0 if persistent else 1)
            if not persistent:
                sock.close()
                sock = None
            continue
        sock.close()
        sock = None
        if not got and reset:
            tally.add(reset_after_request=1)
            with tally.lock:
                tally.problems.append(f"reset after sending {payload!r}, before any reply")
        elif not got:
            tally.add(refused_clean=1)
        elif payload.startswith(got):
            tally.add(half=1)
            with tally.lock:
                tally.problems.append(f"half reply {got!r} to {payload!r}")
        else:
            tally.add(wrong=1)
            with tally.lock:
                tally.problems.append(f"wrong reply {got!r} to {payload!r}")
    if sock is not None:
        sock.close()


def run(mode: str, seconds: float, clients: int, reload_every: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="skl") as tmpdir:
        tmp = Path(tmpdir)
        log = tmp / "sockd.log"
        config = tmp / "sockd.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:0"]\nmode = "{mode}"\n'
            'handler = "tests.handlers:LineEcho"\nshutdown_timeout = 20\n'
            f'[logging]\nlevel = "info"\noutput = "{log}"\n'
            f'[control]\nsocket = "{tmp}/ctl.sock"\n'
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, "-m", "sockd", "--config", str(config)], cwd=REPO, env=env
        )
        port = 0
        deadline = time.monotonic() + 15
        while not port:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("sockd did not start")
            if log.exists():
                for line in log.read_text().splitlines():
                    event = json.loads(line)
                    if event["event"] == "server.listening":
                        port = int(event["address"].rsplit(":", 1)[1])
            time.sleep(0.02)  # start-up polling, not part of the measurement
        tally = Tally()
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client, args=(("127.0.0.1", port), i, i % 2 == 0, tally, stop))
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        reloads = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(reload_every)  # the reload cadence under test
            proc.send_signal(signal.SIGHUP)
            reloads += 1
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        stop.set()
        for t in threads:
            t.join(30)
        events = [json.loads(line) for line in log.read_text().splitlines()]
        sent_by_server = sum(e.get("bytes_out") or 0 for e in events if e["event"] == "conn.close")
        applied = sum(1 for e in events if e["event"] == "reload.applied")
        stopped = next(e for e in events if e["event"] == "server.stopped")
        return {
            "mode": mode,
            "exit_status": rc,
            "completed": tally.completed,
            "of_them_fresh_connections": tally.completed_fresh,
            "refused_clean": tally.refused_clean,
            "reset_after_request": tally.reset_after_request,
            "half_replies": tally.half,
            "wrong_replies": tally.wrong,
            "client_bytes_received": tally.received_bytes,
            "server_bytes_sent": sent_by_server,
            "reloads_sent": reloads,
            "reloads_applied": applied,
            "drain_cut": stopped["cut"],
            "problems": tally.problems[:10],
        }


def lost(result: dict[str, object]) -> bool:
    return bool(
        result["half_replies"]
        or result["wrong_replies"]
        or result["reset_after_request"]
        or result["exit_status"] != 0
        or result["client_bytes_received"] != result["server_bytes_sent"]
        or result["drain_cut"]
        or not result["completed"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["threading", "forking", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--reload-every", type=float, default=0.25)
    args = parser.parse_args()
    modes = ["threading", "forking"] if args.mode == "both" else [args.mode]
    failed = False
    for mode in modes:
        result = run(mode, args.seconds, args.clients, args.reload_every)
        verdict = "LOSS" if lost(result) else "OK"
        failed |= verdict == "LOSS"
        print(
            f"{mode:9} {verdict}: "
            + ", ".join(f"{k}={v}" for k, v in result.items() if k != "problems")
        )
        for problem in result["problems"]:  # type: ignore[attr-defined]
            print(f"    {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
