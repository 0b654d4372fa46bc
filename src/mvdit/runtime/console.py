"""One-line messages to stderr that stay whole when several processes share it.

`print(msg, file=sys.stderr)` issues two writes (the text, then the newline), so two ranks failing at the same moment
can print `msgAmsgB\\n\\n`. `say` hands the kernel the line and its newline in one write; writes to a pipe of up to
PIPE_BUF bytes (4096 on Linux) are atomic, so each line arrives whole.
"""

from __future__ import annotations

import os
import sys


def say(line: str) -> None:
    """Write `line` and a newline to stderr in one system call, after whatever stderr had buffered."""
    text = line.rstrip("\n") + "\n"
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError: stderr replaced (pytest's capsys)
        sys.stderr.write(text)  # one call with the newline inside, flushed whole
        sys.stderr.flush()
        return
    data = text.encode(errors="replace")
    while data:
        data = data[os.write(fd, data) :]
