"""Where an export (or the demo) may write, and how it replaces OUT without losing user data.

Rules (`claim` then `commit`):
- OUT is replaced only when it is empty or an edgert artifact (an `edgert.json` of format
  "edgert" and nothing but the files an export writes, EXPORT_FILES), and only with --force when
  it is not empty; never when it is, or contains, the source.
- One export per OUT at a time: a lock file beside OUT (`.OUT.lock`, flock'ed, removed at the
  end) makes a second concurrent export fail at once instead of silently winning.
- The folder is built in `.OUT.partial-PID` and renamed into place at the end; OUT is checked
  again just before, so a folder that appeared at OUT meanwhile is refused, not deleted.
- SIGTERM and SIGHUP (what `timeout` and systemd send) unwind like Ctrl-C: the partial folder
  is removed. Partial folders of dead exports (SIGKILL, power loss) are removed by the next
  export to the same OUT, which holds the lock and so knows nobody is writing them.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path


class OutError(Exception):
    """OUT cannot be written; one line for the user."""


# What an export writes (artifact._seal, both routes): --force replaces a folder holding only
# these, so a user's own file that happens to sit beside an edgert.json is never deleted.
EXPORT_FILES = frozenset({"edgert.json", "model.onnx", "model.onnx.data", "config.json", "generation_config.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"})
_GRAPH = re.compile(r"^model\.[A-Za-z0-9_+]+\.onnx$")       # the variants' graphs (Graph.variants)


def _foreign(out: Path) -> str | None:
    """The first entry of OUT that no export writes (a folder counts), else None."""
    for p in sorted(out.iterdir()):
        if p.is_dir() and not p.is_symlink() or not (p.name in EXPORT_FILES or _GRAPH.match(p.name)):
            return p.name
    return None


def is_artifact(path: Path) -> bool:
    try:
        m = json.loads((path / "edgert.json").read_text(encoding="utf-8")[:1 << 20])
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == "edgert"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out(out: Path, force: bool, source: Path | None = None) -> str:
    """Refuse an OUT that must not be replaced; returns its state: "absent", "empty" or "artifact".
    A path that cannot even be looked at (too long a name, no permission, a symlink loop) is one line."""
    try:
        return _check_out(out, force, source)
    except RuntimeError as e:               # Path.resolve on a symlink loop (Python < 3.13)
        raise OutError(f"cannot resolve {out} or the source: {e}") from None
    except OSError as e:
        raise OutError(f"{e.filename or out}: {e.strerror or e}") from None


def _check_out(out: Path, force: bool, source: Path | None) -> str:
    real = out.resolve()
    if source is not None and _inside(source.resolve(), real):
        raise OutError(f"{out} is or contains the source model {source}: choose another output folder")
    if out.is_symlink():
        raise OutError(f"{out} is a symbolic link: not replacing it (give the real folder)")
    if out.exists() and not out.is_dir():
        raise OutError(f"{out} exists and is not a folder: not replacing it")
    if not out.exists():
        return "absent"
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise OutError(f"{out}: cannot read it ({e.strerror})") from None
    if empty:
        return "empty"
    if not is_artifact(out):
        raise OutError(f"{out} is not empty and not an edgert artifact: not replacing it, even with --force "
                       f"(choose another folder)")
    if not force:
        raise OutError(f"{out} already exists and is not empty (use --force to replace it)")
    foreign = _foreign(out)
    if foreign is not None:
        raise OutError(f"{out} holds {foreign[:80]!r}, which an export does not write: not replacing it, even with "
                       f"--force (move it away or choose another folder)")
    if not os.access(out, os.W_OK | os.X_OK):   # its files could not be removed: the old copy would stay beside it
        raise OutError(f"{out} cannot be replaced: no permission to remove its files (a read-only folder or file system)")
    return "artifact"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """flock on `.OUT.lock` beside OUT; the file is removed on release. Where the filesystem has
    no flock (some Android storage), the file is created exclusively and holds the owner's pid."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.fd = None

    def _busy(self):
        return OutError(f"another export is writing {self.path.parent / self.path.name[1:-5]} "
                        f"(lock {self.path}); wait for it or choose another folder")

    def _acquire_exclusive(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise self._busy() from None
                with contextlib.suppress(OSError):
                    os.unlink(self.path)       # left by a dead export
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return
        raise self._busy()

    def acquire(self):
        import fcntl
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                if e.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOLCK):
                    return self._acquire_exclusive()     # an empty file (ours, just created) counts as stale
                raise
            try:   # the holder may have removed the file between our open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise OutError(f"{self.path}: lock keeps changing; is another export running?")

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _remove_stale(out: Path) -> None:
    """Partial/old folders of earlier exports to OUT: with the lock held nobody writes them,
    but a live process of that pid is left alone anyway."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    with contextlib.suppress(OSError):
        for p in out.parent.iterdir():
            m = pattern.match(p.name)
            if m and (int(m.group(2)) == os.getpid() or not _alive(int(m.group(2)))) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


class _Terminate(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into the same unwinding as Ctrl-C."""


def _raise_terminate(signum, frame):
    raise _Terminate(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_unwind():
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, so `finally` blocks clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def writing(out: Path, force: bool, source: Path | None = None):
    """Claim OUT: yields the temporary folder to fill; `commit(tmp)` (via the yielded callable)
    moves it into place. On any exit without commit the temporary folder is removed."""
    check_out(out, force, source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutError(f"cannot create {out.parent}: {e.strerror}") from None
    lock = _Lock(out)
    try:
        lock.acquire()
    except OSError as e:
        raise OutError(f"cannot write beside {out}: {e.strerror}") from None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        _remove_stale(out)
        check_out(out, force, source)           # again, under the lock
        tmp.mkdir()

        def commit():
            state = check_out(out, force, source)   # something may have appeared at OUT meanwhile
            if state == "artifact":
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
                if os.path.lexists(old):        # an immutable file, say (check_out saw a writable folder)
                    raise OutError(f"{out} is the new artifact, but its old copy could not be removed: "
                                   f"remove {old} by hand")
            else:
                tmp.rename(out)     # onto nothing or an empty folder; a non-empty one makes rename fail
        yield tmp, commit
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
