# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Real OOM kills, safely: each in a memory cgroup of its own with a small limit, removed afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

V1_MEMORY = '/sys/fs/cgroup/memory'
V2_CANDIDATES = ('/sys/fs/cgroup', '/sys/fs/cgroup/unified')
VICTIM_PYTHON = '/usr/bin/python3'

# Runs in the child: join the cgroup, take the given name and oom_score_adj, then allocate
# (bytearray touches every page) until the cgroup's limit makes the kernel kill it. Modes:
# 'main' allocates in the main thread, 'thread' in a second thread, 'threads:N' in N threads at
# once (4 MB at a time, until killed); 'hold' allocates, says 'ready' and waits (a bystander the
# OOM killer may choose). Optionally pinned to one CPU.
VICTIM_SCRIPT = """
import ctypes, mmap, os, sys, threading, time
procs, comm, adj, mb, mode, cpu = sys.argv[1:7]
with open(procs, 'w') as f:
    f.write(str(os.getpid()))
with open('/proc/self/oom_score_adj', 'w') as f:
    f.write(adj)
if cpu != '-':
    os.sched_setaffinity(0, {int(cpu)})
libc = ctypes.CDLL(None, use_errno=True)
def name_thread(): libc.prctl(15, ctypes.c_char_p(comm.encode('utf-8', 'surrogateescape')), 0, 0, 0)  # PR_SET_NAME
def allocate(): globals()['hog'] = bytearray(int(mb) * 1024 * 1024)
name_thread()
hogs = []
def allocate_until_killed():  # the pages are touched in C, without the GIL: the threads fault at once
    name_thread()
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    while True:
        chunk = mmap.mmap(-1, 4 * 1024 * 1024)
        hogs.append(chunk)
        libc.memset(ctypes.addressof(ctypes.c_char.from_buffer(chunk)), 1, len(chunk))
if mode == 'thread':
    worker = threading.Thread(target=lambda: (name_thread(), allocate()))
    worker.start()
    worker.join()
elif mode == 'adopted':  # first become an orphan that its pid namespace's init adopted
    while os.getppid() != 1:
        time.sleep(0.01)
    allocate()
elif mode.startswith('threads:'):
    workers = [threading.Thread(target=allocate_until_killed) for _ in range(int(mode.split(':')[1]))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
else:
    allocate()
if mode == 'hold':
    print('ready', flush=True)
    time.sleep(3600)
sys.exit(3)  # not reached when the OOM killer does its job
"""


# When this test run last made the kernel kill: the kernel's OOM report header (the trigger, the
# constraint, the cgroup's usage) is rate-limited to 10 reports per 5 s (oom_rs); the "Killed
# process" line is not.
LAST_KILL = [0.0]
OOM_REPORT_RATELIMIT_SECONDS = 5.1


def wait_for_full_oom_reports() -> None:
    """Let the kernel's rate limit on OOM report headers expire, so the next kills get full reports."""
    time.sleep(max(0.0, LAST_KILL[0] + OOM_REPORT_RATELIMIT_SECONDS - time.monotonic()))


@dataclass(frozen=True)
class Victim:
    pid: int
    returncode: int
    started: float
    ended: float


def _v2_memory_root() -> str | None:
    for root in V2_CANDIDATES:
        try:
            with open(os.path.join(root, 'cgroup.controllers')) as f:
                if 'memory' in f.read().split():
                    return root
        except OSError:
            continue
    return None


class MemoryCgroup:
    """A memory cgroup of its own (v1 or v2, whichever has the memory controller).

    `below` puts it under levels of parents of those names (made here, removed with it).
    """

    def __init__(
        self,
        limit_mb: int = 32,
        prefix: str = 'ebpf-probe-test',
        below: tuple[str, ...] = (),
        name: str | None = None,
        limit_on_parent: bool = False,
    ):
        self.name = name or f'{prefix}-{uuid.uuid4().hex[:10]}'  # the prefix may hold odd characters
        v2_root = _v2_memory_root()
        if os.path.isdir(V1_MEMORY):
            self.version, root = 1, V1_MEMORY
        elif v2_root:
            self.version, root = 2, v2_root
        else:
            raise RuntimeError('no memory cgroup controller mounted (v1 memory or v2 with +memory)')
        self._made: list[str] = []
        parent = root
        for level in below:
            parent = os.path.join(parent, level)
            os.mkdir(parent)
            self._made.append(parent)
            if self.version == 2:
                with open(os.path.join(parent, 'cgroup.subtree_control'), 'w') as f:
                    f.write('+memory')
        self.dir = os.path.join(parent, self.name)
        os.mkdir(self.dir)
        self._made.append(self.dir)
        # The limit on the leaf, or on the level above it (a pod's limit above its containers').
        self.limited = parent if limit_on_parent else self.dir
        limit = str(limit_mb * 1024 * 1024)
        if self.version == 1:
            self._write('memory.limit_in_bytes', limit)
            if os.path.exists(os.path.join(self.limited, 'memory.memsw.limit_in_bytes')):
                self._write('memory.memsw.limit_in_bytes', limit)  # no escape into swap
        else:
            self._write('memory.max', limit)
            if os.path.exists(os.path.join(self.limited, 'memory.swap.max')):
                self._write('memory.swap.max', '0')
        # The path the kernel reports for this cgroup, relative to its hierarchy's root.
        self.path = '/' + '/'.join((*below, self.name))

    def _write(self, name: str, value: str, folder: str | None = None) -> None:
        with open(os.path.join(folder or self.limited, name), 'w') as f:
            f.write(value)

    def kernel_oom_kills(self, folder: str | None = None) -> int:
        """The kernel's count of OOM kills in this cgroup (memory.events on v2, memory.oom_control on v1)."""
        name = 'memory.events' if self.version == 2 else 'memory.oom_control'
        with open(os.path.join(folder or self.dir, name)) as f:
            for line in f:
                key, _, value = line.partition(' ')
                if key == 'oom_kill':
                    return int(value)
        raise AssertionError(f'{name} has no oom_kill line: this kernel does not count kills per cgroup')

    @property
    def limited_path(self) -> str:
        """The path the kernel reports for the cgroup that holds the limit."""
        return self.path if self.limited == self.dir else self.path.rsplit('/', 1)[0]

    @property
    def inode(self) -> int:
        """The cgroup directory's inode number: the kernfs id the kernel gives the cgroup."""
        return os.stat(self.dir).st_ino

    def start(
        self, comm: str | bytes, oom_score_adj: int = 0, alloc_mb: int = 256, mode: str = 'main', cpu: int | None = None
    ) -> subprocess.Popen:
        """A process in this cgroup running VICTIM_SCRIPT (see its modes)."""
        comm_arg = os.fsencode(comm) if isinstance(comm, str) else comm
        return subprocess.Popen(
            [VICTIM_PYTHON.encode(), b'-c', VICTIM_SCRIPT.encode(), os.path.join(self.dir, 'cgroup.procs').encode(),
             comm_arg, str(oom_score_adj).encode(), str(alloc_mb).encode(), mode.encode(),
             b'-' if cpu is None else str(cpu).encode()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def oom_kill(
        self,
        comm: str | bytes = 'oom-victim',
        oom_score_adj: int = 0,
        alloc_mb: int = 256,
        mode: str = 'main',
        cpu: int | None = None,
    ) -> Victim:
        """Run a process that overflows the limit; returns once the kernel has killed it.

        comm may be bytes that are not UTF-8: the victim names itself with them.
        """
        started = time.time()
        proc = self.start(comm, oom_score_adj, alloc_mb, mode, cpu)
        _, stderr = proc.communicate(timeout=120)
        LAST_KILL[0] = time.monotonic()
        victim = Victim(proc.pid, proc.returncode, started, time.time())
        if victim.returncode != -signal.SIGKILL:
            raise AssertionError(f'victim {proc.pid} was not OOM killed: exit {proc.returncode}, {stderr!r}')
        return victim

    def remove(self) -> None:
        for folder in reversed(self._made):
            self._remove(folder)

    @staticmethod
    def _remove(folder: str) -> None:
        for _ in range(100):
            try:
                with open(os.path.join(folder, 'cgroup.procs')) as f:
                    pids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(folder)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)  # the killed tasks are still leaving
        raise RuntimeError(f'could not remove {folder}')


def vmstat_oom_kills() -> int:
    """The host's count of OOM kills, read where the kernel keeps it (/proc/vmstat's oom_kill)."""
    with open('/proc/vmstat') as f:
        [count] = [int(line.split()[1]) for line in f if line.startswith('oom_kill ')]
    return count
