# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""How often the eBPF stats probe did its costly things, counted from outside (tests, benchmarks).

The product keeps no counters for its tests: these wrap the calls that do the work (a walk of
every process's file descriptors; the sampler's BPF_ENABLE_STATS, which opens a window of run-time
statistics, and the close of its fd, which ends it), through a pytest MonkeyPatch.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from datadog_checks.ebpf_probe.ebpf_stats import owners, runtime


class OwnerScans:
    """Walks of every process's file descriptors, looking for the holders of eBPF objects."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        rescan = owners.OwnerTracker._rescan

        def counted(tracker: owners.OwnerTracker) -> None:
            rescan(tracker)
            self.count += 1

        monkeypatch.setattr(owners.OwnerTracker, '_rescan', counted)


class StatisticsWindows:
    """Windows of run-time statistics opened, and how long they stayed open in all (closed ones)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.opened = 0
        self.seconds = 0.0
        self._open: dict[int, float] = {}  # fd -> when its window opened
        self._lock = threading.Lock()
        enable_stats, close = runtime.enable_stats, os.close

        def opening(*args: int) -> int:
            fd = enable_stats(*args)
            with self._lock:
                self.opened += 1
                self._open[fd] = time.monotonic()
            return fd

        def closing(fd: int) -> None:
            with self._lock:
                opened = self._open.pop(fd, None)
                if opened is not None:
                    self.seconds += time.monotonic() - opened
            close(fd)

        monkeypatch.setattr(runtime, 'enable_stats', opening)
        monkeypatch.setattr(runtime.os, 'close', closing)

    @property
    def closed(self) -> int:
        with self._lock:
            return self.opened - len(self._open)
