"""Control-plane latency, idle vs under full data-plane load, side by side in one run.

Starts sockd (threading mode, echo handler, JSON logs at info to a file) from a config
in a temporary directory and measures, first on an idle data plane, then while several
client processes do 64-byte echo round trips on persistent loopback connections as fast
as they can:
- ``status`` latency through ``sockctl.client.ControlClient`` in this process
  (request to parsed answer), many samples: p50 / p99;
- ``sockctl status`` as a subprocess, a few runs (includes interpreter start-up): p50 / max;
- the duration of a reload whose only change is ``logging.level`` (the file is rewritten
  between requests, toggling info/warning; timed from request to answer with
  ``ControlClient.reload()``), many repetitions: p50 / p99.
Targets: status p99 < 50 ms under load; reload p99 < 50 ms, idle and under load. The
CLI figure is reported only (it is dominated by Python's start-up). Exit status 1 if a
target is missed (``--no-fail`` to only report).

    .venv/bin/python bench/control_bench.py [--clients 4] [--samples 300] [--reloads 100]

Only loopback is used; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from sockctl.client import ControlClient

REPO = Path(__file__).resolve().parent.parent
MESSAGE = b"x" * 64
TARGET_MS = 50.0
#: A load client gives up after this long even if nobody tells it to stop.
LOAD_HARD_LIMIT_S = 120.0


# --------------------------------------------------------------------------- sockd


def write_config(tmp: Path, level: str) -> Path:
    config = tmp / "bench.toml"
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\nmode = "threading"\n'
        f'[logging]\nlevel = "{level}"\nformat = "json"\noutput = "{tmp}/sockd.log"\n'
        f'[control]\nsocket = "{tmp}/ctl.sock"\n'
    )
    return config


def start_sockd(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / "sockd.log"
    log.unlink(missing_ok=True)
    config = write_config(tmp, "info")
    proc = subprocess.Popen([sys.executable, "-m", "sockd", "--config", str(config)], cwd=REPO)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists():
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "server.listening":
                    return proc, int(event["address"].rsplit(":", 1)[1])
        time.sleep(0.02)  # polling a file for start-up, not a measurement
    proc.kill()
    raise SystemExit(f"sockd did not start (exit status {proc.poll()})")


# --------------------------------------------------------------------------- load


def _echo_client(port: int, ready: mp.Queue, stop: EventType, out: mp.Queue) -> None:  # type: ignore[type-arg]
    count = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready.put(os.getpid())
        began = time.monotonic()
        hard_end = began + LOAD_HARD_LIMIT_S
        while not stop.is_set() and time.monotonic() < hard_end:
            for _ in range(50):
                sock.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise SystemExit("sockd closed a load connection")
                    got += len(chunk)
            count += 50
        out.put((count, time.monotonic() - began))


class Load:
    """``clients`` processes doing echo round trips until ``stop()``; bounded by a hard limit."""

    def __init__(self, port: int, clients: int) -> None:
        self._ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        self._out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        self._stop = mp.Event()
        self.result = (0, 0.0)
        self._procs = [
            mp.Process(target=_echo_client, args=(port, self._ready, self._stop, self._out))
            for _ in range(clients)
        ]

    def __enter__(self) -> Load:
        for p in self._procs:
            p.start()
        for _ in self._procs:
            self._ready.get(timeout=30)  # every client connected and exchanging
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> tuple[int, float]:
        """Stop the clients; total round trips and the longest client's duration."""
        if self._stop.is_set():
            return self.result  # already stopped
        self._stop.set()
        results = [self._out.get(timeout=60) for _ in self._procs]
        for p in self._procs:
            p.join(30)
        self.result = (sum(r[0] for r in results), max(r[1] for r in results))
        return self.result


# --------------------------------------------------------------------------- measurements


@dataclass
class Series:
    samples_ms: list[float] = field(default_factory=list)

    def pct(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100)."""
        ordered = sorted(self.samples_ms)
        if not ordered:
            return math.nan
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


def status_series(client: ControlClient, samples: int, budget_s: float) -> Series:
    series = Series()
    deadline = time.monotonic() + budget_s
    for _ in range(samples):
        if time.monotonic() > deadline:
            break
        series.samples_ms.append(timed(client.status))
    return series


def cli_series(sockctl: str, socket_path: Path, runs: int) -> Series:
    series = Series()
    for _ in range(runs):
        began = time.perf_counter()
        result = subprocess.run(
            [sockctl, "--socket", str(socket_path), "status"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        series.samples_ms.append((time.perf_counter() - began) * 1000)
        if result.returncode != 0:
            raise SystemExit(f"sockctl status failed: {result.stderr.decode().strip()}")
    return series


def reload_series(client: ControlClient, tmp: Path, reloads: int, budget_s: float) -> Series:
    series = Series()
    level = client.status()["log_level"]
    deadline = time.monotonic() + budget_s
    for _ in range(reloads):
        if time.monotonic() > deadline:
            break
        level = "warning" if level == "info" else "info"
        write_config(tmp, level)  # outside the timed section: only request to answer counts
        began = time.perf_counter()
        answer = client.reload()
        series.samples_ms.append((time.perf_counter() - began) * 1000)
        keys = [change["key"] for change in answer["changes"]]
        if answer["result"] != "applied" or keys != ["logging.level"]:
            raise SystemExit(f"unexpected reload answer: {answer}")
    return series


def find_sockctl() -> str:
    beside = Path(sys.executable).parent / "sockctl"
    found = str(beside) if beside.exists() else shutil.which("sockctl")
    if found is None:
        raise SystemExit("the sockctl command is not installed (pip install -e .)")
    return found


# --------------------------------------------------------------------------- report


def fmt(value: float) -> str:
    return f"{value:8.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="load client processes")
    parser.add_argument("--samples", type=int, default=300, help="status samples per phase")
    parser.add_argument("--cli-runs", type=int, default=10, help="sockctl runs per phase")
    parser.add_argument("--reloads", type=int, default=100, help="reloads per phase")
    parser.add_argument("--budget", type=float, default=20.0, help="max seconds per series")
    parser.add_argument("--no-fail", action="store_true")
    args = parser.parse_args()
    sockctl = find_sockctl()
    results: dict[str, dict[str, Series]] = {"idle": {}, "load": {}}
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="skc") as tmpdir:
        tmp = Path(tmpdir)
        proc, port = start_sockd(tmp)
        try:
            client = ControlClient(str(tmp / "ctl.sock"), timeout=30)
            client.status()  # warm-up: first import paths, first connection
            for phase in ("idle", "load"):
                load = Load(port, args.clients) if phase == "load" else None
                with load if load is not None else contextlib.nullcontext():
                    results[phase]["status"] = status_series(client, args.samples, args.budget)
                    results[phase]["cli"] = cli_series(sockctl, tmp / "ctl.sock", args.cli_runs)
                    results[phase]["reload"] = reload_series(client, tmp, args.reloads, args.budget)
                if load is not None:
                    round_trips, seconds = load.result
            still_running = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            exit_status = proc.wait(60)
    if not still_running:
        raise SystemExit("sockd exited during the benchmark")

    rate = round_trips / seconds
    print(
        f"control benchmark: sockd threading, {args.clients} load client processes "
        f"(64 B echo, persistent), {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    print(f"  data plane under load: {rate:,.0f} round trips/s over {seconds:.1f} s")
    print(
        f"  {'measurement (ms)':30} {'n':>4} {'idle p50':>9} {'idle p99':>9} "
        f"{'load p50':>9} {'load p99':>9}  target"
    )
    ok = True
    rows = [
        ("status, ControlClient", "status", "p99 < 50 under load", ("load",)),
        ("status, sockctl CLI (p99=max)", "cli", "report only", ()),
        ("reload, log level only", "reload", "p99 < 50 idle and load", ("idle", "load")),
    ]
    for title, key, target, judged in rows:
        idle, loaded = results["idle"][key], results["load"][key]
        missed = [p for p in judged if not results[p][key].pct(99) < TARGET_MS]
        ok &= not missed
        verdict = "" if not judged else ("OK" if not missed else "MISSED")
        n = min(len(idle.samples_ms), len(loaded.samples_ms))
        print(
            f"  {title:30} {n:>4} {fmt(idle.pct(50))} {fmt(idle.pct(99))} "
            f"{fmt(loaded.pct(50))} {fmt(loaded.pct(99))}  {target} {verdict}".rstrip()
        )
    if exit_status != 0:
        print(f"  sockd exited with status {exit_status} after SIGTERM")
        ok = False
    return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
