# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel's own count of its OOM kills against the kills reported: none unaccounted for.

The kernel counts every kill it makes in /proc/vmstat (oom_kill). Each run, the increase of that
counter is compared with the kills reported (and those dropped for want of room); the kills it
counted that were not reported are `unaccounted` (the kernel counts the victim it chose for a
group kill twice: it kills it again with the rest of its memory.oom.group cgroup). The count is
kept in the Agent's persistent cache with the boot's id, so that kills while the check was not
running (an Agent restart or upgrade, the probe still loading) are counted on the next run, and
a reboot is recognised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

VMSTAT = '/proc/vmstat'
BOOT_ID = '/proc/sys/kernel/random/boot_id'
CACHE_KEY = 'oom_kill_ledger'


def kernel_oom_kills(path: str = VMSTAT) -> int | None:
    """The kernel's count of OOM kills since boot (None on kernels before 4.13, which have none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith('oom_kill '):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def boot_id(path: str = BOOT_ID) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ''


@dataclass
class Reconciliation:
    unaccounted: int  # kills the kernel counted and nobody reported, since the last reconciliation
    over_reported: int  # kills reported that the kernel has not counted (to be absorbed, else a mistake)
    since_restart: bool  # this reconciliation covers the time the check was not running


class UnaccountedKills:
    """Kills counted by the kernel vs kills reported, one reconciliation per check run.

    count() is taken before the probe is drained. The kernel's counter and the record of a kill
    are not written at once, in either order: the kprobe paths write the record first, the
    tracepoints (mark_victim) after the counter moved. So either difference is carried one run:
    a kill reported that the counter does not have yet, and a kill counted whose record has not
    come yet; only what is still unexplained a run later is over-reported, or unaccounted.
    """

    def __init__(
        self,
        read_cache: Callable[[str], str],
        write_cache: Callable[[str, str], None],
        read_count: Callable[[], int | None] = kernel_oom_kills,
        read_boot_id: Callable[[], str] = boot_id,
    ):
        self._read_cache = read_cache
        self._write_cache = write_cache
        self._read_count = read_count
        self._boot = read_boot_id()
        self._last: int | None = None  # the kernel's count at the last reconciliation
        self._counted: int | None = None  # the kernel's count taken for the current run
        self._pending = 0  # < 0: kills reported ahead of the kernel's count; > 0: counted, record not come yet
        self._restarted = False

    def _start(self, now: int) -> int:
        """Where the count stood when the check last ran: from the cache, on this boot."""
        try:
            saved = json.loads(self._read_cache(CACHE_KEY) or '{}')
        except ValueError:
            saved = {}
        if not saved:
            return now  # first run ever: nothing before it is ours to count
        self._restarted = True
        if saved.get('boot_id') == self._boot and isinstance(saved.get('oom_kill'), int):
            return min(saved['oom_kill'], now)
        return 0  # rebooted since: every kill of this boot happened while the check was not running

    def count(self) -> None:
        """The kernel's count now, before the probe is drained."""
        self._counted = self._read_count()

    def reconcile(self, reported: int, probe_running: bool = True) -> Reconciliation | None:
        """Account for the kills reported this run (including those dropped); None where the kernel keeps no count.

        probe_running: False when no probe could report anything this run: every kill counted is unaccounted now.
        """
        now, self._counted = self._counted, None
        if now is None:
            return None
        if self._last is None:
            self._last = self._start(now)
        balance = now - self._last - reported + self._pending
        self._last = now
        since_restart, self._restarted = self._restarted, False
        self._write_cache(CACHE_KEY, json.dumps({'boot_id': self._boot, 'oom_kill': now}))
        if balance >= 0:
            if since_restart or not probe_running:
                unaccounted = balance  # kills no probe was there to see: no record is on its way
            else:  # what was held last run and is still unexplained; this run's own excess is held
                unaccounted = min(max(self._pending, 0), balance)
            self._pending = balance - unaccounted
            return Reconciliation(unaccounted, 0, since_restart)
        # More reported than counted: a kill whose count comes a moment later is absorbed by the
        # next run; what is still over then was never a kill the kernel made.
        over, self._pending = (-balance, 0) if self._pending < 0 else (0, balance)
        return Reconciliation(0, over, since_restart)
