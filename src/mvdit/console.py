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
    sys.stderr.flush()
    data = (line.rstrip("\n") + "\n").encode(errors="replace")
    fd = sys.stderr.fileno()
    while data:
        data = data[os.write(fd, data) :]
