"""Entry point of the image's ``volume`` stage: own the snapshot directory, drop root, exec.

A platform volume (a Fly volume for rolling deploys, see fly/fly.rolling.toml) may be
mounted owned by root, and a node running as an unprivileged user then cannot write its
snapshots there (``Node`` refuses to start with a ``ConfigError`` saying so). This runs as
root only long enough to create ``$HANDOFF_SNAPSHOT_DIR`` and give it to the service user,
then becomes that user and executes the command (the image's ``CMD``, or Fly's
``release_command``, which replaces ``CMD`` but not ``ENTRYPOINT``).

Started as any other user it changes nothing and executes the command directly.
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ("main",)

SERVICE_USER = "shop"


def _own(directory: Path, uid: int, gid: int) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Snapshot files are written by the service user; a previous root-run may have left some.
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chown(path, uid, gid)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the snapshot directory and execute ``argv`` (default: ``sys.argv[1:]``)."""
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print("usage: volume_entrypoint COMMAND [ARG ...]", file=sys.stderr)
        return 2
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVICE_USER)
        snapshot_dir = os.environ.get("HANDOFF_SNAPSHOT_DIR", "").strip()
        if snapshot_dir:
            _own(Path(snapshot_dir), user.pw_uid, user.pw_gid)
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
        os.environ["HOME"] = user.pw_dir
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
