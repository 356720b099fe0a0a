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
import threading
import time
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
# Calls a second function (a bpf-to-bpf call, 4.16+), which returns 0: two functions, JIT-compiled apart.
CALL_AND_RETURN_ZERO = bytes.fromhex('8510000001000000') + bytes.fromhex('9500000000000000') + RETURN_ZERO
OWNER_COMM = 'bpf-fixture'


def bpftool(*args: str) -> list[dict]:
    return json.loads(subprocess.run(['bpftool', '-j', *args], capture_output=True, check=True, text=True).stdout)


def held_by_me() -> dict[int, str]:
    """id -> name (the kernel's 15 characters) of each program this process holds a file descriptor
    of, as the kernel shows them: /proc/self/fdinfo's prog_id, bpftool's names."""
    ids = set()
    for fd in os.listdir('/proc/self/fdinfo'):
        try:
            with open(f'/proc/self/fdinfo/{fd}') as f:
                ids.update(int(line.split()[1]) for line in f if line.startswith('prog_id:'))
        except OSError:
            continue  # closed meanwhile (the listing's own fd)
    return {p['id']: p['name'] for p in bpftool('prog', 'show') if p['id'] in ids}


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
        self.comm: str = description['comm']
        self._proc = proc
        self.prefix: str = description['prefix']
        self.maps = {kind: TestMap(**m) for kind, m in description['maps'].items()}
        self.program_id: int = description['program']['id']
        self.program_name: str = description['program']['name']

    @classmethod
    def start(cls, comm: str = OWNER_COMM) -> TestObjects:
        proc = subprocess.Popen(
            [sys.executable, __file__, comm], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the BPF fixture process failed (exit {proc.wait()})')
        return cls(proc.pid, proc, json.loads(line))

    def _ask(self, command: str) -> str:
        self._proc.stdin.write(command + '\n')
        answer = self._proc.stdout.readline().strip()
        assert answer.startswith('ok'), (command, answer)
        return answer[3:]

    def run_program(self, times: int) -> None:
        self._ask(f'run {times}')

    def start_pacing(self, runs: int, every_ms: float) -> None:
        """Run the program `runs` times every `every_ms` milliseconds, on a fixed schedule, until stop_pacing()."""
        self._ask(f'pace {runs} {every_ms}')

    def stop_pacing(self) -> int:
        """Stop pacing; how many runs pacing made."""
        return int(self._ask('stop'))

    def paced_runs(self) -> int:
        """Runs pacing made so far."""
        return int(self._ask('count'))

    def new_map(self) -> int:
        """A new hash map held by the fixture process: its id."""
        return int(self._ask('map'))

    def hold(self, map_id: int) -> None:
        """Open an fd to an existing map (by id) and keep it."""
        self._ask(f'hold {map_id}')

    def release(self, map_id: int) -> None:
        """Close the fixture's fd to that map (the process lives on)."""
        self._ask(f'release {map_id}')

    def fork(self, comm: str) -> int:
        """A child process named `comm` that inherits every fd and sleeps until killed: its pid."""
        return int(self._ask(f'fork {comm}'))

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


def make_test_objects(comm: str = OWNER_COMM) -> TestObjects:
    return TestObjects.start(comm)


def _serve(comm: str) -> None:
    """Owner side: make the objects, describe them on stdout, then run the program on request."""
    ctypes.CDLL(None).prctl(15, comm.encode(), 0, 0, 0)  # PR_SET_NAME
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
        'comm': comm,
        'prefix': prefix,
        'maps': maps,
        'program': {'id': libbpf.prog_info(program).id, 'name': program_name},
    }
    print(json.dumps(description), flush=True)
    pacer = None
    held: dict[int, int] = {}  # map id -> fd, for maps made or opened on request
    for line in sys.stdin:
        command, _, arg = line.strip().partition(' ')
        if command == 'run':
            libbpf.prog_test_run(program, bytes(64), repeat=int(arg))
            print('ok', flush=True)
        elif command == 'pace':
            runs, every_ms = arg.split()
            pacer = _Pacer(program, int(runs), float(every_ms) / 1000)
            print('ok', flush=True)
        elif command == 'count':
            print(f'ok {pacer.runs if pacer else 0}', flush=True)
        elif command == 'stop':
            print(f'ok {pacer.stop() if pacer else 0}', flush=True)
            pacer = None
        elif command == 'map':
            fd = map_create(MAP_HASH, f'{prefix}_new'[:15], 4, 8, 16)
            held[libbpf.map_info(fd).id] = fd
            print(f'ok {libbpf.map_info(fd).id}', flush=True)
        elif command == 'hold':
            held[int(arg)] = libbpf.fd_by_id('map', int(arg))
            print('ok', flush=True)
        elif command == 'release':
            os.close(held.pop(int(arg)))
            print('ok', flush=True)
        elif command == 'fork':
            ready_read, ready_write = os.pipe()
            child = os.fork()
            if child == 0:  # keeps every fd, renames itself, sleeps until killed
                ctypes.CDLL(None).prctl(15, arg.encode(), 0, 0, 0)
                os.write(ready_write, b'.')
                while True:
                    time.sleep(60)
            os.read(ready_read, 1)  # renamed: whoever looks sees its new name
            os.close(ready_read)
            os.close(ready_write)
            print(f'ok {child}', flush=True)


class _Pacer:
    """Runs a program a number of times per period on a fixed schedule (a steady workload), in a thread."""

    def __init__(self, program: int, runs: int, period: float):
        self.runs = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(program, runs, period), daemon=True)
        self._thread.start()

    def _loop(self, program: int, runs: int, period: float) -> None:
        deadline = time.monotonic()
        while not self._stopping.is_set():
            libbpf.prog_test_run(program, bytes(64), repeat=runs)
            self.runs += runs
            deadline += period
            delay = deadline - time.monotonic()
            if delay > 0:
                self._stopping.wait(delay)

    def stop(self) -> int:
        self._stopping.set()
        self._thread.join()
        return self.runs


if __name__ == '__main__':
    _serve(sys.argv[1] if len(sys.argv) > 1 else OWNER_COMM)


def statistics_holders() -> dict[int, int]:
    """pid -> BPF_ENABLE_STATS file descriptors it holds (the kernel names them anon_inode:bpf-stats)."""
    holders: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f'/proc/{pid}/fd/{fd}') == 'anon_inode:bpf-stats':
                    holders[int(pid)] = holders.get(int(pid), 0) + 1
            except OSError:
                continue
    return holders


def counted_with_statistics_off(mine_allowed: bool = False) -> None:
    """The kernel counted runs while this process had statistics off (or saw them on elsewhere): a
    skip if another process (or the sysctl) keeps them on, as on a shared machine (in a VM row, where
    nothing else runs, a skip is a failure); a failure if no one else does."""
    import pytest

    holders = statistics_holders()
    mine = holders.pop(os.getpid(), 0)
    assert mine_allowed or not mine, f'this process still holds {mine} BPF_ENABLE_STATS fd(s): statistics left on'
    with open('/proc/sys/kernel/bpf_stats_enabled') as f:
        sysctl = f.read().strip() == '1'
    assert holders or sysctl, 'the kernel counted runs with statistics off, and no one else holds them on'
    pytest.skip(f'BPF statistics are kept on elsewhere: processes {sorted(holders)}, sysctl {int(sysctl)}')
