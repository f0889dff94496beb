"""Who may use the control channel, and how much of it.

Owns peer credentials (``SO_PEERCRED``, the peer's groups from ``/proc`` or the group
database), the roles (``all``: root, the daemon's own uid and members of
``control.group``; ``read``: members of ``control.read_group``, ``GET`` only; anyone else
none), each role's budgets of concurrent connections and log followers, and the socket
file's mode and group that let every granted role connect. A leaf of the package:
imports nothing from ``sockd.control``; outside it only ``sockd.config`` and
``sockd.errors``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from sockd.config import ControlConfig
from sockd.errors import ControlError

#: Concurrent control connections per role, each role from its own budget: readers
#: cannot take an admin's slots, and peers the credential check refuses never get one
#: (they are closed in the accept loop). Each connection holds a thread for at most
#: the request timeout while it sends its request; the excess get an immediate 503
#: written from the accept loop.
CONNECTION_BUDGET: Final[Mapping[str, int]] = {"all": 96, "read": 32}
MAX_CONNECTIONS: Final = CONNECTION_BUDGET["all"]
#: Log followers (``GET /v1/logs?follow=1``) per role, within its connection budget:
#: an admin always keeps ``96 - 64`` slots for requests however many follow.
FOLLOWER_BUDGET: Final[Mapping[str, int]] = {"all": 64, "read": 16}

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Role = Literal["all", "read"]


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a control connection, as the kernel saw it."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return cls(pid, uid, gid)

    def groups(self) -> frozenset[int]:
        """Primary and supplementary gids.

        ``/proc/<pid>/status`` gives the groups the process really has (``setgroups``,
        ``newgrp``, systemd's ``SupplementaryGroups=``); the group database is the
        fallback when the process is gone or its uid no longer matches (the pid may
        have been reused since it connected).
        """
        gids = {self.gid}
        from_proc = _proc_groups(self.pid, self.uid)
        if from_proc is not None:
            return frozenset(gids | from_proc)
        try:
            entry = pwd.getpwuid(self.uid)
        except KeyError:
            return frozenset(gids)
        gids.add(entry.pw_gid)
        with contextlib.suppress(OSError):
            gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return frozenset(gids)


def _proc_groups(pid: int, uid: int) -> set[int] | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    uids = fields.get("Uid", [])
    # SO_PEERCRED records the effective uid at connect(); a mismatch means another
    # process now owns this pid, so its groups say nothing about our peer.
    if len(uids) < 2 or uids[1] != str(uid):
        return None
    try:
        return {int(g) for g in fields.get("Groups", [])}
    except ValueError:
        return None


def _resolve_group(key: str, name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ControlError(f"{key}: no such group {name!r}") from None


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may do what on the control channel (see the table in docs/control-api.md)."""

    own_uid: int
    group_gid: int | None
    read_gid: int | None

    @classmethod
    def from_settings(cls, settings: ControlConfig) -> Policy:
        """Resolve group names now, so a typo fails at start/reload, not at first use."""
        return cls(
            own_uid=os.geteuid(),
            group_gid=_resolve_group("control.group", settings.group),
            read_gid=_resolve_group("control.read_group", settings.read_group),
        )

    def role(self, peer: Peer) -> Role | None:
        if peer.uid in (0, self.own_uid):
            return "all"
        if self.group_gid is None and self.read_gid is None:
            return None
        gids = peer.groups()
        if self.group_gid is not None and self.group_gid in gids:
            return "all"
        if self.read_gid is not None and self.read_gid in gids:
            return "read"
        return None


def file_access(settings: ControlConfig, policy: Policy) -> tuple[int, int | None]:
    """The socket file's mode and group, so that every role the policy grants can connect.

    Connecting to a Unix socket needs write permission on its file, which is checked
    before our credential check ever runs. The file's group is ``control.group``, or
    ``control.read_group`` when only that is set. With both set, one file cannot carry
    two groups, so "other" gets read/write too and the credential check (SO_PEERCRED,
    which refuses everyone outside root, our uid and the two groups) is the gate.
    """
    mode = settings.mode
    if policy.group_gid is not None:
        if policy.read_gid is not None:
            mode |= 0o006
        return mode, policy.group_gid
    return mode, policy.read_gid
