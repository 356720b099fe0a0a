# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Following a child process's output."""

import signal
import subprocess
from typing import TextIO


def read_until(stream: TextIO, text: str) -> str:
    """The lines of a child's output up to and with the first one holding `text`; fails if it ends first."""
    lines = []
    while True:
        line = stream.readline()
        lines.append(line)
        if text in line:
            return ''.join(lines)
        if not line:
            raise AssertionError(f'{text!r} never came; the output was: ' + ''.join(lines))


# `ebpf-probe check --pause` for a test that acts between two runs: long enough for anything an
# emulated CPU is slow at, ended by next_run_now() as soon as the test's action is done.
UNTIL_TOLD = '600000'


def next_run_now(proc: subprocess.Popen) -> None:
    """Have `ebpf-probe check` end its pause and make the next run at once (SIGUSR1)."""
    proc.send_signal(signal.SIGUSR1)
