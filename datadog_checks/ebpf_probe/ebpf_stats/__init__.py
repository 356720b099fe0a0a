# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Feature: every eBPF program and map on the host, with run time, memory, entries and owners.

records.py    what is reported of each program and map (pure)
probe.py      the probe: loads the iterators, snapshot(), close()
inventory.py  every program and map with their figures (iterators, else object by object)
entries.py    entry counting where the kernel has no counting kfunc
owners.py     who holds each object (processes, bpffs pins), looked for again only on change
runtime.py    run-time statistics on for a window of each interval (bounded tax), or held
links.py      link ids, and the runs kprobes missed
metrics.py    snapshots -> metric points: grouping, deltas, scaling, patterns, limits (pure)
"""

from .metrics import MetricOptions, NamePatterns, StatsMetrics
from .probe import EbpfStatsOptions, EbpfStatsProbe
from .records import EbpfSnapshot, MapRecord, Owner, ProgramRecord, RunTimeCoverage

__all__ = [
    'EbpfSnapshot',
    'EbpfStatsOptions',
    'EbpfStatsProbe',
    'MapRecord',
    'MetricOptions',
    'NamePatterns',
    'Owner',
    'ProgramRecord',
    'RunTimeCoverage',
    'StatsMetrics',
]
