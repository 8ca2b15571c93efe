"""Bounds on what the runtime reads from the user before it does any work (README: Security).

Text is read with a size cap (a prompt from stdin, `--text`), a prompt is refused by its length
before it is tokenized whole, and `--threads` is refused above the CPU cores (onnxruntime
would start every thread it is told to).
"""
from __future__ import annotations

import os

MAX_STDIN_BYTES = 16 << 20       # a prompt on stdin
MAX_TEXT_BYTES = 64 << 20        # `edgert eval --text`, `edgert export --calib`
CHARS_PER_TOKEN = 64             # a prompt longer than context x this cannot fit: refused before tokenizing


class InputTooLarge(ValueError):
    pass


def read_capped(f, limit: int, what: str) -> str:
    """UTF-8 text from a binary stream, refusing more than `limit` bytes (reads at most limit + 1)."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise InputTooLarge(f"{what} is larger than {limit >> 20} MB; refused")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputTooLarge(f"{what} is not UTF-8 text") from None


def read_text_file(path, limit: int = MAX_TEXT_BYTES, what: str | None = None) -> str:
    """A file's UTF-8 text, capped. A pipe (`<(cmd)`, /dev/stdin, a named FIFO) is opened without
    waiting for a writer, so a FIFO nobody writes to reads as empty instead of blocking; a device
    (/dev/zero) is read up to the cap like a file."""
    import stat
    what = what or str(path)
    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | (os.O_NONBLOCK if fifo else 0))
        os.set_blocking(fd, True)       # a writer that is there is then read to its end
        with os.fdopen(fd, "rb") as f:
            return read_capped(f, limit, what)
    except OSError as e:
        raise InputTooLarge(f"{what}: cannot read it ({e.strerror or e})") from None


def read_stdin(limit: int = MAX_STDIN_BYTES) -> str:
    import sys
    return read_capped(sys.stdin.buffer, limit, "the prompt on stdin")


def write_text_atomic(path, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` all or nothing: a temporary file beside it, renamed over it; the
    temporary is removed on any failure (OSError propagates). Permissions `mode`, else a plain new
    file's (0666 less the umask; mkstemp's own would be 0600)."""
    import tempfile
    from pathlib import Path
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_prompt_length(text: str, context: int) -> None:
    """Refuse, before tokenizing, a text that cannot fit `context` tokens."""
    if len(text) > context * CHARS_PER_TOKEN:
        from .llm import PromptTooLong
        raise PromptTooLong(f"the prompt has {len(text)} characters, more than the {context}-token context can hold "
                            f"(at most {CHARS_PER_TOKEN} characters per token); shorten it or raise --context")


def cpu_count() -> int:
    return os.cpu_count() or 1


def check_threads(threads: int | None) -> int | None:
    """--threads between 1 and the CPU cores here (None = the default)."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cpu_count():
        raise ValueError(f"--threads must be between 1 and {cpu_count()} (the CPU cores here), not {threads}")
    return threads
