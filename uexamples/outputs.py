"""Output folders that are never half-written, never shared by two runs, never lost on ``--overwrite``.

- :func:`check_output` runs before any work: the path must be a new or empty folder (or ``--overwrite``),
  not a file, not the current directory or one of its parents, in a place we can write.
- :class:`OutputLock` makes a run's output exclusive: ``OUTPUT.lock`` is created atomically and names
  the process; a second run on the same output is refused; a lock left by a killed process is taken over.
- :func:`partial_dir` is unique to the run (``OUTPUT.partial-<pid>-<random>``), and :func:`move_into_place`
  renames it to ``OUTPUT`` only when everything is written. With ``--overwrite`` the old and the new
  folder are *exchanged* in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so a kill at any
  moment leaves a complete output, old or new.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path


class OutputError(ValueError):
    """The output path cannot be used; the message says why and what to do."""


def check_output(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work starts, an output that cannot be written or would be lost."""
    out = Path(out_dir)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise OutputError(f"--output {out_dir} is the current directory or one of its parents: name a new folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out_dir} is an existing file: name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out_dir} is not empty; pass --overwrite to replace it")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the output {out_dir}: {parent} is not writable")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``with OutputLock(out_dir):`` only one run writes ``out_dir`` at a time."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        self.path = self.out.with_name(self.out.name + ".lock")
        self.held = False

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                owner = self._owner()
                raise OutputError(
                    f"{self.out} is being written by another run (process {owner.get('pid')} on {owner.get('host')}, "
                    f"since {owner.get('since')}); wait for it to finish or choose another --output "
                    f"(remove {self.path} if that run is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            remove_stale_partials(self.out)
            return self
        raise OutputError(f"cannot take the lock {self.path}")

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        owner = self._owner()
        if not owner:  # being written this very moment, or garbage: garbage if old
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except OSError:
                return True
        return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def partial_dir(out_dir: str | os.PathLike) -> Path:
    """A folder next to the output, unique to this run, to write into."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")


def remove_stale_partials(out_dir: Path) -> None:
    """Partial folders of killed runs on this output (their process is gone)."""
    for p in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[1])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; with ``overwrite`` swap it with the old output atomically."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out} appeared while this run worked and is not empty; the result is kept in {tmp}")
        if _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old output
            return
        old = out.with_name(f"{out.name}.old-{secrets.token_hex(3)}")
        out.rename(old)  # fallback: a kill between these two renames leaves both complete folders
        tmp.rename(out)
        shutil.rmtree(old)
        return
    os.replace(tmp, out) if out.is_dir() else tmp.rename(out)
