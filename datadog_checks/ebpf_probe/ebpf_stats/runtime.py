# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Run-time statistics of every eBPF program, at a bounded cost to those programs.

The kernel counts a program's run time and runs only while statistics are on (some process holds
a BPF_ENABLE_STATS file descriptor, or the kernel.bpf_stats_enabled sysctl is 1), and then every
run of every program on the host pays two clock reads (measured here: 41 ns -> 117 ns for a
trivial program). Holding them on all the time, as the check did, taxes every program always.

RunTimeSampler turns them on for a window of each check interval (`fraction` of it, at a random
place so that nothing periodic hides from it, the first one right after the first run) and
reports the share of the interval that was counted: the check scales run time and run counts
by its inverse, so a steady workload reads the same, and the tax is `fraction` of the full one.

If the counters move while the sampler has statistics off, someone else has them on (bpftop,
the sysctl): the counters then hold more than our windows, and the deltas are reported as they
are, unscaled. The sysctl is only read, never written. Counters are read just before a window
opens and, once the runs that started inside it had time to finish, just after it closes; a
snapshot's own read is ordered with those (one lock), so each read is compared with the last
one made while statistics were off.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from datadog_checks.ebpf_probe.kernel.libbpf import enable_stats

from .records import ALWAYS_COUNTED, RunTimeCoverage

T = TypeVar('T')
STATS_SYSCTL = '/proc/sys/kernel/bpf_stats_enabled'
# After a window closes: runs that started inside it still add to the counters (they check whether
# statistics are on once, when they start). Runs last microseconds; this is plenty.
SETTLE_SECONDS = 0.02
# Windows end this share of an interval before the next run is expected.
MARGIN = 0.1

# program id -> (run_time_ns, run_cnt)
Counters = dict[int, tuple[int, int]]


def stats_sysctl_on(path: str = STATS_SYSCTL) -> bool:
    """Whether kernel.bpf_stats_enabled is 1: statistics on for everyone, whatever we do."""
    try:
        with open(path, 'rb') as f:
            return f.read().strip() == b'1'
    except OSError:
        return False


def moved(before: Counters, after: Counters) -> bool:
    """Whether any program present in both counted a run or run time between the two reads."""
    for prog_id, counters in after.items():
        previous = before.get(prog_id)
        if previous is not None and previous != counters:
            return True
    return False


class HeldStats:
    """Statistics on for the probe's whole life: exact counts, the full tax (fraction 1)."""

    def __init__(self) -> None:
        self._fd: int | None = enable_stats()

    def observe(self, read: Callable[[], tuple[T, Counters]]) -> tuple[T, RunTimeCoverage]:
        return read()[0], ALWAYS_COUNTED

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # statistics go off with the last such fd
            self._fd = None


class RunTimeSampler:
    """Statistics on for a window of each interval, from a thread of its own; see the module doc.

    read_counters: the programs' run-time counters now (called by the thread, around windows).
    interval: the expected seconds between snapshots until two snapshots have measured one.
    """

    def __init__(
        self,
        fraction: float,
        interval: float,
        read_counters: Callable[[], Counters],
        log: logging.Logger | logging.LoggerAdapter,
        clock: Callable[[], float] = time.monotonic,
        sysctl_on: Callable[[], bool] = stats_sysctl_on,
    ):
        if not 0 < fraction < 1:
            raise ValueError(f'a sampled fraction is between 0 and 1, not {fraction}')
        self._fraction = fraction
        self._interval = interval
        self._configured_interval = interval
        self._read_counters = read_counters
        self._log = log
        self._clock = clock
        self._sysctl_on = sysctl_on
        self._random = random.Random()
        # One lock orders windows and snapshots; the condition wakes the thread.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._fd: int | None = None  # the BPF_ENABLE_STATS fd, while a window is open
        self._counted_since = 0.0  # where the open window's counted time starts (its opening, or the last snapshot)
        self._counted = 0.0  # seconds counted since the last snapshot
        self._baseline: Counters | None = None  # the last read made while statistics were off (ours)
        self._settling = False  # a window just closed: its last runs may still add to the counters
        self._external = False  # counters moved while ours were off, since the last snapshot
        self._last_snapshot: float | None = None
        self._next_window: tuple[float, float] | None = None  # (start, length) of the window to open
        self.error: str | None = None  # why windows stopped (BPF_ENABLE_STATS refused...)
        self._thread = threading.Thread(target=self._run, name='ebpf-probe-run-time-sampler', daemon=True)
        self._thread.start()

    # --- the check's side ---------------------------------------------------------------------

    def observe(self, read: Callable[[], tuple[T, Counters]]) -> tuple[T, RunTimeCoverage | None]:
        """Run read() (a snapshot's read of the programs) in order with the windows.

        Returns what read() returned and how much of the interval since the previous observe() was
        counted (None on the first one: no interval yet).
        """
        with self._lock:
            result, counters = read()
            now = self._clock()
            if self._fd is not None:  # a window is open: count it up to now, the rest goes to the next interval
                self._counted += now - self._counted_since
                self._counted_since = now
            elif not self._settling:  # statistics off (ours): the counters must not have moved
                if self._baseline is not None and moved(self._baseline, counters):
                    self._external = True
                self._baseline = counters
            coverage = None
            if self._last_snapshot is not None:
                elapsed = now - self._last_snapshot
                if self._external:
                    coverage = RunTimeCoverage(None, 'external')
                elif self._sysctl_on():
                    coverage = RunTimeCoverage(None, 'sysctl')
                else:
                    coverage = RunTimeCoverage(min(1.0, self._counted / elapsed) if elapsed > 0 else 0.0, 'sampled')
                self._interval = elapsed if elapsed > 0 else self._interval
            first = self._last_snapshot is None
            self._last_snapshot = now
            self._counted = 0.0
            self._external = False
            self._schedule(now, first)
            return result, coverage

    def _schedule(self, now: float, first: bool) -> None:
        # The interval as measured (the Agent runs checks late when it is busy), within reason: a
        # long pause of the Agent must not make a long window.
        length = self._fraction * min(self._interval, 2 * self._configured_interval)
        if self._fd is not None:
            self._next_window = None  # the open window stands for this interval's
            return
        # The first window right away (a second run soon after has something); the others anywhere
        # in the interval, ending before the next run is expected.
        room = max(0.0, self._interval * (1 - MARGIN) - length)
        start = now if first else now + self._random.uniform(0, room)
        self._next_window = (start, length)
        self._wake.notify()

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._window():
                pass
        except Exception as e:  # never a silent death: the check reports no run time, and why
            self._log.warning('Program run-time statistics stopped: %s', e)
            self._log.debug('The run-time sampler failed', exc_info=True)
            with self._lock:
                self.error = str(e)
                self._close_fd()

    def _wait_until(self, deadline: float) -> bool:
        """Wait (lock held) until the deadline or close(); False when closing."""
        while not self._stopping:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return True
            self._wake.wait(remaining)
        return False

    def _window(self) -> bool:
        """Open, hold and close one window; False when closing."""
        with self._lock:
            while self._next_window is None and not self._stopping:
                self._wake.wait()
            if self._stopping or self._next_window is None:
                return False
            start, length = self._next_window
            if not self._wait_until(start):
                return False
            if self._next_window != (start, length):
                return True  # a snapshot came meanwhile and moved the window
            self._next_window = None
            if self._sysctl_on():
                return True  # statistics are on for everyone already: no window, no tax of ours
            counters = self._read_counters()
            if self._baseline is not None and moved(self._baseline, counters):
                self._external = True
            self._fd = enable_stats()
            self._counted_since = self._clock()
            self._baseline = None
            closes = self._counted_since + length
            completed = self._wait_until(closes)
            self._counted += self._clock() - self._counted_since
            self._close_fd()
            if not completed:
                return False
            self._settling = True
            if not self._wait_until(self._clock() + SETTLE_SECONDS):
                return False
            self._baseline = self._read_counters()
            self._settling = False
            return True

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # statistics go off with the last such fd
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            self._close_fd()
