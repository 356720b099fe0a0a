# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Kernel functions from /proc/kallsyms: whether one exists, and addresses for naming the frames of a kernel stack."""

from __future__ import annotations

import threading

KALLSYMS = '/proc/kallsyms'
FUNCTION_KINDS = (b' t ', b' T ')  # text symbols, local and global


def has_function(name: str, path: str = KALLSYMS) -> bool:
    """Whether the kernel has this function (not inlined away). Names show even where
    kptr_restrict hides the addresses (no CAP_SYSLOG)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError:
        return False
    return any(kind + name.encode() + b'\n' in data for kind in FUNCTION_KINDS)


def function_names(addresses: list[int], path: str = KALLSYMS) -> list[str | None]:
    """The function at each address (an exact start: what a kprobe_multi link attaches to); None
    where none starts there, or kptr_restrict hides the addresses."""
    wanted = {a: i for i, a in enumerate(addresses) if a}
    names: list[str | None] = [None] * len(addresses)
    if not wanted:
        return names
    try:
        with open(path, 'rb') as f:
            for line in f:
                address, kind, rest = line.split(b' ', 2)
                if kind in (b't', b'T') and int(address, 16) in wanted:
                    names[wanted[int(address, 16)]] = rest.split(b'\t', 1)[0].strip().decode()
    except (OSError, ValueError):
        pass
    return names


class KernelSymbols:
    """Address ranges of a few kernel functions, from /proc/kallsyms, read once on demand.

    Only the wanted functions are kept (the whole table would cost megabytes). Reading the
    file costs tens of milliseconds (the kernel formats 5 MB of text), so prefetch() does it
    in the background as soon as it is known to be needed.
    """

    def __init__(self, names: frozenset[str], path: str = KALLSYMS):
        self._names = names
        self._path = path
        self._ranges: dict[str, tuple[int, int]] | None = None
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        if self._ranges is None:
            threading.Thread(target=self.ranges, name='ebpf-probe-kallsyms', daemon=True).start()

    def ranges(self) -> dict[str, tuple[int, int]]:
        """name -> [start, end) of each wanted function found with a real address."""
        with self._lock:
            if self._ranges is None:
                self._ranges = self._read()
            return self._ranges

    def _read(self) -> dict[str, tuple[int, int]]:
        try:
            with open(self._path, 'rb') as f:
                data = f.read()
        except OSError:
            return {}
        ranges: dict[str, tuple[int, int]] = {}
        for name in self._names:
            for kind in FUNCTION_KINDS:
                at = data.find(kind + name.encode() + b'\n')
                if at < 0:
                    continue
                start = int(data[data.rfind(b'\n', 0, at) + 1 : at], 16)
                end = self._next_address(data, at + len(kind) + len(name) + 1, start)
                if start and end:  # zero addresses: kallsyms hidden by kptr_restrict
                    ranges[name] = (start, end)
                break
        return ranges

    @staticmethod
    def _next_address(data: bytes, line: int, start: int) -> int | None:
        """A function ends where the next symbol at a higher address starts."""
        while line < len(data):
            space = data.find(b' ', line)
            if space < 0:
                return None
            address = int(data[line:space], 16)
            if address > start:
                return address
            line = data.find(b'\n', space) + 1
            if line == 0:
                return None
        return None

    def find(self, address: int) -> str | None:
        for name, (start, end) in self.ranges().items():
            if start <= address < end:
                return name
        return None
