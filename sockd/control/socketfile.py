"""The control socket's file: its directory, its mode and group, its replacement.

Owns every filesystem step around the socket path: the directory must be one nobody but
root and the daemon's user can change (``check_directory``, like sshd's StrictModes;
missing directories are created without following a symlink planted meanwhile), a stale
socket is replaced but a live daemon's or a non-socket is refused
(``refuse_if_taken``), the mode and group are set through a descriptor that cannot
follow a symlink, all or nothing (``set_access``), and the file is removed only while it
is still ours (``unlink_if_ours``). A leaf of the package: imports nothing from
``sockd.control``; outside it only ``sockd.errors`` and ``sockd.protocol``.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat

from sockd.errors import ControlError
from sockd.protocol import path_entries, untrusted_entry


def ensure_directory(path: str, parent: str) -> None:
    """Check the socket's directory (creating it if missing) is ours to trust."""
    if check_directory(path):
        return
    try:
        _make_directories(parent)
    except OSError as exc:
        raise ControlError(
            f"cannot create control socket directory {parent}: {exc.strerror}"
        ) from None
    if not check_directory(path):
        raise ControlError(
            f"cannot create control socket directory {parent}: not there after creating it"
        )


def _make_directories(parent: str) -> None:
    """Create the missing directories of ``parent``, mode 0755, following no new symlink.

    The existing part was just judged by ``check_directory``. Each missing component is
    made with ``mkdir`` relative to a descriptor of the one above, then opened with
    ``O_NOFOLLOW`` and given its mode through that descriptor: if another user (in a
    sticky directory such as ``/tmp``) gets there first with a symlink or a directory of
    their own, it is refused and nothing is changed through it (``makedirs`` and
    ``chmod`` by path would follow the link and change its target).
    """
    existing, missing = parent, list[str]()
    while not os.path.lexists(existing):
        existing, name = os.path.split(existing)
        missing.insert(0, name)
    fd = os.open(existing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in missing:
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False  # made since we looked: judged below like any other
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise ControlError(
                    f"refusing to create control socket directory {parent}: "
                    f"{os.path.join(existing, name)} appeared as a symlink or a file, not "
                    "a directory (another user racing us?)"
                ) from None
            os.close(fd)
            fd = child
            existing = os.path.join(existing, name)
            info = os.fstat(fd)
            if info.st_uid not in (0, os.geteuid()):
                raise ControlError(
                    f"refusing to create control socket directory {parent}: {existing} "
                    f"appeared, owned by {_who(info.st_uid)} (another user racing us?)"
                )
            if created:
                # mkdir's mode is filtered by the umask; 0755 lets group members (and
                # others the socket's own mode admits) reach the socket.
                os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def check_directory(path: str) -> bool:
    """Refuse a socket path another user could redirect; False if its directory is missing.

    Like sshd's StrictModes: every directory and symlink the path's lookup goes through
    must belong to root or to the daemon's euid, and no directory may be writable by
    group or others, except an ancestor with the sticky bit (``/tmp``: others cannot
    rename what we own in it). The socket's own directory may not be writable by others
    even with the sticky bit: anyone could plant a socket there while we are stopped,
    and ``sockctl`` would talk to it.
    """
    euid = os.geteuid()
    try:
        entries, complete = path_entries(path)
    except OSError as exc:
        raise ControlError(
            f"cannot create control socket {path}: {exc.filename}: {exc.strerror}"
        ) from None
    found = untrusted_entry(
        entries, (0, euid), lambda index: not (complete and index == len(entries) - 1)
    )
    if found is not None:
        entry, why = found
        info = entry.info
        kind = "symlink" if entry.is_link else "directory"
        problem = (
            f"is owned by {_who(info.st_uid)}"
            if why == "owner"
            else f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
        )
        raise ControlError(
            f"refusing to create control socket {path}: {kind} {entry.path} {problem}; "
            f"the socket's directory and those above it must belong to root or "
            f"{_who(euid)} and not be writable by others (a directory above may be, "
            "with the sticky bit, like /tmp), or another user could replace the socket"
        )
    return complete


def set_access(
    path: str, mode: int, gid: int | None, identity: tuple[int, int] | None
) -> os.stat_result:
    """Set the socket file's mode and group without following a path swapped in.

    The file is opened with ``O_PATH | O_NOFOLLOW`` (a symlink at ``path`` is opened as
    the link itself), checked to be a socket (and, with ``identity``, ours), and changed
    through ``/proc/self/fd``, which names that very inode: whatever happens at
    ``path`` afterwards, nothing else is touched. (``fchmod`` on the socket's own
    descriptor changes the socket object, not the file it is bound to.)

    All or nothing: a group the daemon cannot give the file (not root, and not a member
    of it) is refused before anything changes; the group is changed before the mode
    (a mode meant for a group must never apply to the old one); and if either change
    fails, the previous mode and group are put back.
    """
    if gid is not None:
        _check_can_chown(path, gid)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or (
            identity is not None and (info.st_dev, info.st_ino) != identity
        ):
            raise ControlError(
                f"control socket {path} was removed or replaced by something else; "
                "restart sockd to recreate it"
            )
        by_fd = f"/proc/self/fd/{fd}"
        old_mode, old_gid = stat.S_IMODE(info.st_mode), info.st_gid
        try:
            if gid is not None and old_gid != gid:
                os.chown(by_fd, -1, gid)
            if old_mode != mode:
                os.chmod(by_fd, mode)
        except BaseException:
            # Mode first: while the old group is back, the new mode must not be in force.
            with contextlib.suppress(OSError):
                os.chmod(by_fd, old_mode)
            with contextlib.suppress(OSError):
                os.chown(by_fd, -1, old_gid)
            raise
        return os.fstat(fd)
    finally:
        os.close(fd)


def _check_can_chown(path: str, gid: int) -> None:
    """Refuse a group an unprivileged daemon cannot give its socket (EPERM otherwise).

    Only root (CAP_CHOWN) may give a file a group its owner is not in; the daemon's own
    groups are its effective gid and its supplementary groups.
    """
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return
    try:
        name = f"{grp.getgrgid(gid).gr_name!r} (gid {gid})"
    except KeyError:
        name = f"gid {gid}"
    raise ControlError(
        f"cannot give control socket {path} the group {name}: sockd runs as "
        f"{_who(os.geteuid())}, which is not a member of it (only root can); add the "
        "user to the group, or choose one of its groups"
    )


def refuse_if_taken(path: str) -> None:
    """Leave a stale socket to be replaced; refuse a live one or anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nobody listens (its daemon died without cleaning up)
    except (TimeoutError, BlockingIOError):
        pass  # a full backlog: somebody is listening
    except OSError as exc:
        raise ControlError(f"cannot probe control socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"another sockd is already running on control socket {path}")


def unlink_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file unless something else has been put at that path since."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if (info.st_dev, info.st_ino) == identity:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
