# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Kills sent from user space as signals: who sent them, one occurrence per victim.

The kernel side records each SIGKILL and SIGTERM a known memory killer sends, and each SIGKILL to
a process whose death may end its container (pid 1 of a pid namespace, or a child of it). Here
they become kills:

- a memory killer's SIGTERM then SIGKILL to one victim is one kill, which says it took both; a
  SIGTERM alone is held until the victim is gone (a kill, by SIGTERM) or has outlived
  SIGTERM_GRACE_SECONDS (a warning: it survived, no kill); where the check cannot see the host's
  processes (no hostPID), whether it died of it is not known, and said so (a warning, no kill);
- a SIGKILL to a container's main process is a kill (exit 137), its killer a memory killer, a
  container runtime (a stop, an eviction, a failed liveness probe) or another process; to a
  process that is not, or not known to be, its container's main process, from anyone but a
  memory killer: nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

from datadog_checks.ebpf_probe.kernel import features

from . import record
from .record import OOMKill

# Who killed: the kernel's OOM killer, or the sender's kind.
KERNEL = 'kernel'
MEMORY_KILLER = 'memory_killer'
CONTAINER_RUNTIME = 'container_runtime'
OTHER = 'other'
# Container runtimes and engines that stop containers, by name (comm, at most 15 characters:
# containerd-shim-runc-v2 is containerd-shim).
CONTAINER_RUNTIMES = frozenset(
    {'runc', 'crun', 'youki', 'runsc', 'containerd-shim', 'containerd', 'conmon', 'podman', 'dockerd', 'docker'}
)
# A process still there this long after a memory killer's SIGTERM survived it (earlyoom and nohang
# send SIGKILL within seconds when SIGTERM does not do).
SIGTERM_GRACE_SECONDS = 60.0

_TICKS_PER_SECOND = os.sysconf('SC_CLK_TCK')


def runtime_name(comm: str) -> str | None:
    """The container runtime a process name is, if any. Runtimes re-execute themselves from a
    sealed copy (crun: memfd:crun_clone, as the kernel keeps it memfd:crun_clon) or name their
    stages (runc:[2:INIT]): the name before those marks."""
    base = comm.removeprefix('memfd:')
    for mark in ('_', ':'):
        base = base.split(mark, 1)[0]
    name = base if base in CONTAINER_RUNTIMES else comm
    return name if name in CONTAINER_RUNTIMES else None


def killer_type(kill: OOMKill, memory_killers: frozenset[str]) -> str:
    if kill.signal is None:
        return KERNEL
    if kill.trigger_comm in memory_killers:
        return MEMORY_KILLER
    return CONTAINER_RUNTIME if runtime_name(kill.trigger_comm) else OTHER


def killer_name(kill: OOMKill) -> str:
    """kernel, a container runtime by its name (crun, not memfd:crun_clon), or the sender's name."""
    if kill.signal is None:
        return KERNEL
    return runtime_name(kill.trigger_comm) or kill.trigger_comm


def still_running(pid: int, start_time_ns: int) -> bool | None:
    """Whether the process with this (host) pid and start time (since boot, suspend counted) is alive:
    not gone, not another process with its pid, not a zombie. None where this process does not see
    the host's pids."""
    if not features.in_host_pid_namespace():
        return None
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b')') + 2 :].split()
    state, start_ticks = fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    return state not in (b'Z', b'X') and start_ticks == start_time_ns * _TICKS_PER_SECOND // 1_000_000_000


@dataclass
class _Held:
    sigterm: OOMKill
    since: float  # monotonic seconds


@dataclass
class UserSpaceKills:
    """What one flush made of the signal records."""

    kills: list[OOMKill] = dataclasses.field(default_factory=list)
    survived: list[OOMKill] = dataclasses.field(default_factory=list)  # SIGTERMs the victim outlived
    # SIGTERMs whose outcome is not known (the check does not see the host's processes).
    outcome_unknown: list[OOMKill] = dataclasses.field(default_factory=list)


class SignalKills:
    """Signal records in, kills out; SIGTERMs held between flushes until their outcome is known."""

    def __init__(
        self,
        memory_killers: tuple[str, ...],
        alive: Callable[[int, int], bool | None] = still_running,
        grace: float | None = None,
        cgroup_v2: bool = True,
        pressure: bool = True,
    ):
        # As the kernel keeps names: the first 15 characters.
        self.memory_killers = frozenset(name[: record.COMM_LEN - 1] for name in memory_killers)
        self._alive = alive
        self._grace = SIGTERM_GRACE_SECONDS if grace is None else grace
        # On cgroup v1 the kernel keeps no memory.events file and no pressure per cgroup: what the
        # record read there is not what a user could check, so it is left out.
        self._cgroup_v2 = cgroup_v2
        self._pressure = pressure and cgroup_v2  # PSI off at boot leaves zeros where the kernel keeps it
        self._held: dict[tuple[int, int, str], _Held] = {}  # (victim pid, start time, killer) -> its SIGTERM

    def _as_users_see_it(self, kill: OOMKill) -> OOMKill:
        """Without what the kernel keeps for users only on cgroup v2 (memory.events) and with PSI on."""
        signal = kill.signal
        memory = signal.cgroup_memory if signal is not None else None
        if signal is None or memory is None or (self._cgroup_v2 and self._pressure):
            return kill
        if not self._pressure:
            memory = dataclasses.replace(memory, pressure_some_avg10=None, pressure_full_avg10=None)
        if not self._cgroup_v2:
            memory = dataclasses.replace(memory, events={})
        return dataclasses.replace(kill, signal=dataclasses.replace(signal, cgroup_memory=memory))

    def sort(self, signals: list[OOMKill], now: float) -> UserSpaceKills:
        """The kills among these records (in the order sent) and the SIGTERMs held that ended."""
        out = UserSpaceKills()
        for kill in signals:
            kill = self._as_users_see_it(kill)
            signal, pid = kill.signal, kill.victim_pid
            assert signal is not None and pid is not None
            if kill.trigger_comm not in self.memory_killers and kill.container_main_process is not True:
                continue  # a SIGKILL that did not end a container, from no memory killer
            key = (pid, signal.victim_start_time_ns, kill.trigger_comm)
            if signal.number == record.SIGTERM:
                self._held.setdefault(key, _Held(kill, now))
                continue
            if self._held.pop(key, None) is not None:
                kill = dataclasses.replace(kill, signal=dataclasses.replace(signal, after_sigterm=True))
            out.kills.append(kill)
        for key, held in list(self._held.items()):
            pid, start_time, _killer = key
            alive = self._alive(pid, start_time)
            if alive is False:
                out.kills.append(held.sigterm)  # gone: the SIGTERM did it
            elif now - held.since < self._grace:
                continue
            else:
                (out.survived if alive else out.outcome_unknown).append(held.sigterm)
            del self._held[key]
        out.kills.sort(key=lambda kill: kill.timestamp)
        return out
