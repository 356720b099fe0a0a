# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Feature: every eBPF program and map on the host, with run time, memory, entries and owners.

records.py  what is reported of each program and map (pure)
probe.py    the probe: iterators, enumeration, snapshot(), close()
entries.py  entry counting where the kernel has no counting kfunc
owners.py   who holds each object (processes, bpffs pins)
metrics.py  snapshots -> metric points: grouping, deltas, patterns, limits (pure)
"""

from .metrics import MetricOptions, NamePatterns, StatsMetrics
from .probe import EbpfStatsOptions, EbpfStatsProbe
from .records import EbpfSnapshot, MapRecord, Owner, ProgramRecord

__all__ = [
    'EbpfSnapshot',
    'EbpfStatsOptions',
    'EbpfStatsProbe',
    'MapRecord',
    'MetricOptions',
    'NamePatterns',
    'Owner',
    'ProgramRecord',
    'StatsMetrics',
]
