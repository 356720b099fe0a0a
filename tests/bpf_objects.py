# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""BPF maps and programs with known contents, held by a process of their own, and what bpftool says of them.

A separate process owns them (as any other tool on the host would), so that they are not
counted as the check's own objects, and so that their owner has a known name.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import uuid
from dataclasses import dataclass

from datadog_checks.ebpf_probe.ebpf_stats.entries import possible_cpus
from datadog_checks.ebpf_probe.kernel import libbpf

try:
    from .bpf_syscalls import map_create, map_update_batch, prog_load
except ImportError:  # run as a script: the process that owns the objects
    from bpf_syscalls import map_create, map_update_batch, prog_load  # type: ignore[no-redef]

MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_LRU_HASH, MAP_HASH_OF_MAPS, MAP_RINGBUF = 1, 2, 5, 9, 13, 27
PROG_SOCKET_FILTER = 1
# r0 = 0; exit
RETURN_ZERO = bytes.fromhex('b700000000000000') + bytes.fromhex('9500000000000000')
OWNER_COMM = 'bpf-fixture'


def bpftool(*args: str) -> list[dict]:
    return json.loads(subprocess.run(['bpftool', '-j', *args], capture_output=True, check=True, text=True).stdout)


def bpftool_struct(name: str) -> list[tuple[str, int]]:
    """(member, byte offset) of a kernel struct as bpftool reads the kernel's BTF ('' for anonymous ones)."""
    raw = subprocess.run(
        ['bpftool', 'btf', 'dump', 'file', '/sys/kernel/btf/vmlinux', 'format', 'raw'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    start = raw.find(f"STRUCT '{name}' ")
    if start < 0:
        return []
    members = []
    for line in raw[start:].splitlines()[1:]:
        if not line.startswith('\t'):
            break
        member, _, rest = line.strip().partition(' ')
        member = member.strip("'")
        members.append(('' if member == '(anon)' else member, int(rest.split('bits_offset=')[1].split()[0]) // 8))
    return members


@dataclass
class TestMap:
    id: int
    name: str
    type: int
    max_entries: int
    entries: int | None  # the true count; None where there is none (arrays, ring buffers)

    def open(self) -> int:
        """An fd to it in this process (the caller closes it)."""
        fd = libbpf.fd_by_id('map', self.id)
        assert fd is not None
        return fd


# (kind, type, max_entries, entries)
LAYOUT = [
    ('hash', MAP_HASH, 1000, 100),
    ('lru', MAP_LRU_HASH, 1000, 50),
    ('hmap', MAP_HASH_OF_MAPS, 100, 10),  # values are maps (an inner hash map)
    ('pcpu', MAP_PERCPU_HASH, 1000, 30),
    ('array', MAP_ARRAY, 64, None),
    ('ringbuf', MAP_RINGBUF, 4 * 4096, None),
    ('big', MAP_HASH, 200_000, 100_000),
]


class TestObjects:
    """Client side: starts the owner process and asks it to run the program."""

    def __init__(self, pid: int, proc: subprocess.Popen, description: dict):
        self.pid = pid
        self._proc = proc
        self.prefix: str = description['prefix']
        self.maps = {kind: TestMap(**m) for kind, m in description['maps'].items()}
        self.program_id: int = description['program']['id']
        self.program_name: str = description['program']['name']

    @classmethod
    def start(cls) -> TestObjects:
        proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the BPF fixture process failed (exit {proc.wait()})')
        return cls(proc.pid, proc, json.loads(line))

    def run_program(self, times: int) -> None:
        self._proc.stdin.write(f'run {times}\n')
        assert self._proc.stdout.readline().strip() == 'ok'

    def program_run_count(self) -> int:
        fd = libbpf.fd_by_id('prog', self.program_id)
        try:
            return libbpf.prog_info(fd).run_cnt
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)


def make_test_objects() -> TestObjects:
    return TestObjects.start()


def _serve() -> None:
    """Owner side: make the objects, describe them on stdout, then run the program on request."""
    ctypes.CDLL(None).prctl(15, OWNER_COMM.encode(), 0, 0, 0)  # PR_SET_NAME
    prefix = 't' + uuid.uuid4().hex[:5]
    inner = map_create(MAP_HASH, f'{prefix}_inner', 4, 8, 4)  # the template of hmap's values, and one of them
    fds = [inner]
    maps = {'inner': {'id': libbpf.map_info(inner).id, 'name': f'{prefix}_inner', 'type': MAP_HASH, 'max_entries': 4,
                      'entries': 0}}  # fmt: skip
    for kind, map_type, max_entries, entries in LAYOUT:
        name = f'{prefix}_{kind}'[:15]
        key_size, value_size = {MAP_RINGBUF: (0, 0), MAP_HASH_OF_MAPS: (4, 4)}.get(map_type, (4, 8))
        fd = map_create(map_type, name, key_size, value_size, max_entries,
                        inner_map_fd=inner if map_type == MAP_HASH_OF_MAPS else None)  # fmt: skip
        if entries:
            keys = b''.join(struct.pack('<I', i) for i in range(entries))
            if map_type == MAP_HASH_OF_MAPS:
                values = struct.pack('<I', inner) * entries
            else:
                values = bytes(8 * (possible_cpus() if map_type == MAP_PERCPU_HASH else 1) * entries)
            assert map_update_batch(fd, keys, values, entries) == entries
        fds.append(fd)
        maps[kind] = {'id': libbpf.map_info(fd).id, 'name': name, 'type': map_type, 'max_entries': max_entries,
                      'entries': entries}  # fmt: skip
    program_name = f'{prefix}_prog'
    program = prog_load(PROG_SOCKET_FILTER, program_name, RETURN_ZERO)
    description = {
        'prefix': prefix,
        'maps': maps,
        'program': {'id': libbpf.prog_info(program).id, 'name': program_name},
    }
    print(json.dumps(description), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(' ')
        if command == 'run':
            libbpf.prog_test_run(program, bytes(64), repeat=int(arg))
            print('ok', flush=True)


if __name__ == '__main__':
    _serve()
