# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Following a child process's output."""

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
