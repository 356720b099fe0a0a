# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Feature: every OOM kill in the kernel, recorded by an eBPF probe and drained each run.

record.py   the record the BPF side writes, decoded into an OOMKill (pure)
hooks.py    the hooks, and which of them this kernel offers
probe.py    what both variants share: options, buffer sizes, get_and_flush()
core.py     the CO-RE variant; bcc.py the BCC one
factory.py  load_oom_kill_probe(): CO-RE first, BCC as the fallback
containers.py, report.py   the container behind a cgroup path; tags and event text
"""

from .factory import load_oom_kill_probe
from .probe import OOMKillProbe, OOMKillProbeOptions
from .record import FlushResult, OOMKill, VictimMemory

__all__ = ['FlushResult', 'OOMKill', 'OOMKillProbe', 'OOMKillProbeOptions', 'VictimMemory', 'load_oom_kill_probe']
