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
# (bytearray touches every page) until the cgroup's limit makes the kernel kill it.
VICTIM_SCRIPT = """
import ctypes, os, sys
procs, comm, adj, mb = sys.argv[1:5]
with open(procs, 'w') as f:
    f.write(str(os.getpid()))
with open('/proc/self/oom_score_adj', 'w') as f:
    f.write(adj)
name = comm.encode('utf-8', 'surrogateescape')
ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
hog = bytearray(int(mb) * 1024 * 1024)
sys.exit(3)  # not reached when the OOM killer does its job
"""


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
    """A memory cgroup of its own (v1 or v2, whichever has the memory controller)."""

    def __init__(self, limit_mb: int = 32, prefix: str = 'ebpf-probe-test'):
        self.name = f'{prefix}-{uuid.uuid4().hex[:10]}'  # the prefix may hold odd characters
        v2_root = _v2_memory_root()
        if os.path.isdir(V1_MEMORY):
            self.version, root = 1, V1_MEMORY
        elif v2_root:
            self.version, root = 2, v2_root
        else:
            raise RuntimeError('no memory cgroup controller mounted (v1 memory or v2 with +memory)')
        self.dir = os.path.join(root, self.name)
        os.mkdir(self.dir)
        limit = str(limit_mb * 1024 * 1024)
        if self.version == 1:
            self._write('memory.limit_in_bytes', limit)
            if os.path.exists(os.path.join(self.dir, 'memory.memsw.limit_in_bytes')):
                self._write('memory.memsw.limit_in_bytes', limit)  # no escape into swap
        else:
            self._write('memory.max', limit)
            if os.path.exists(os.path.join(self.dir, 'memory.swap.max')):
                self._write('memory.swap.max', '0')
        # The path the kernel reports for this cgroup, relative to its hierarchy's root.
        self.path = '/' + self.name

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), 'w') as f:
            f.write(value)

    def oom_kill(self, comm: str | bytes = 'oom-victim', oom_score_adj: int = 0, alloc_mb: int = 256) -> Victim:
        """Run a process that overflows the limit; returns once the kernel has killed it.

        comm may be bytes that are not UTF-8: the victim names itself with them.
        """
        started = time.time()
        comm_arg = os.fsencode(comm) if isinstance(comm, str) else comm
        proc = subprocess.Popen(
            [VICTIM_PYTHON.encode(), b'-c', VICTIM_SCRIPT.encode(), os.path.join(self.dir, 'cgroup.procs').encode(),
             comm_arg, str(oom_score_adj).encode(), str(alloc_mb).encode()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        _, stderr = proc.communicate(timeout=120)
        victim = Victim(proc.pid, proc.returncode, started, time.time())
        if victim.returncode != -signal.SIGKILL:
            raise AssertionError(f'victim {proc.pid} was not OOM killed: exit {proc.returncode}, {stderr!r}')
        return victim

    def remove(self) -> None:
        for _ in range(100):
            try:
                with open(os.path.join(self.dir, 'cgroup.procs')) as f:
                    pids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(self.dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)  # the killed tasks are still leaving
        raise RuntimeError(f'could not remove {self.dir}')
