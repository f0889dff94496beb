"""Starting the servers the benchmarks compare: a bare stdlib one and sockd.

Both run the same handler (``sockd.handlers.EchoHandler``) in a subprocess and report
the port they listen on, so every script measures like with like.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_BARE_SERVER = """
import socketserver
from sockd.handlers import EchoHandler
class Server(socketserver.{base}):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = {backlog}
srv = Server(("127.0.0.1", 0), EchoHandler)
print(srv.server_address[1], flush=True)
try:
    srv.serve_forever()
except KeyboardInterrupt:  # SIGINT ends it cleanly (bench/instructions.py needs that)
    pass
"""


def bare_command(backlog: int = 1024, mode: str = "threading") -> list[str]:
    """The command running a bare server that prints its port on the first line."""
    base = "ForkingTCPServer" if mode == "forking" else "ThreadingTCPServer"
    return [sys.executable, "-c", _BARE_SERVER.format(backlog=backlog, base=base)]


def start_bare(backlog: int = 1024, mode: str = "threading") -> tuple[subprocess.Popen[bytes], int]:
    """A bare ``socketserver.ThreadingTCPServer`` (or ``ForkingTCPServer``) with the same
    backlog as sockd."""
    proc = subprocess.Popen(bare_command(backlog, mode), stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def start_sockd(
    tmp: Path, name: str = "sockd", mode: str = "threading", **server: object
) -> tuple[subprocess.Popen[bytes], int]:
    """sockd logging every connection (JSON, info) to a file, as in production."""
    log = tmp / f"{name}.log"
    log.unlink(missing_ok=True)
    extra = "".join(f"{key} = {value}\n" for key, value in server.items())
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\nmode = "{mode}"\n{extra}'
        f'[logging]\nlevel = "info"\nformat = "json"\noutput = "{log}"\n'
        f'[control]\nsocket = "{tmp}/{name}.sock"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "sockd", "--config", str(config)], cwd=REPO)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists():
            for line in log.read_text().splitlines():
                if '"server.listening"' in line:
                    address = line.split('"address": "')[1].split('"')[0]
                    return proc, int(address.rsplit(":", 1)[1])
        time.sleep(0.02)  # start-up polling, not part of any measurement
    proc.kill()
    raise SystemExit(f"sockd did not start (see {log})")
