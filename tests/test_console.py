"""Error lines from several ranks stay whole: `say` hands each line and its newline to one write."""

from __future__ import annotations

import os
import subprocess
import sys

from mvdit.runtime import console


def test_say_is_one_write_of_the_line_and_its_newline(monkeypatch, capfd):
    writes = []
    real_write = os.write
    monkeypatch.setattr(console.os, "write", lambda fd, data: writes.append((fd, data)) or real_write(fd, data))
    console.say("train.py: out of GPU memory (...); set train.activation_checkpointing: full")
    assert [data for _, data in writes] == [
        b"train.py: out of GPU memory (...); set train.activation_checkpointing: full\n"
    ]
    assert capfd.readouterr().err.endswith("full\n")


def test_lines_from_concurrent_processes_arrive_whole():
    line = "rank{}: " + "x" * 2000
    code = (
        f"import sys; from mvdit.runtime.console import say\nfor _ in range(300): say({line!r}.format(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r, w = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stderr=w, env=env) for i in range(3)]
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read().splitlines()
    assert all(p.wait() == 0 for p in procs)
    assert len(got) == 900 and set(got) == {line.format(i) for i in range(3)}
