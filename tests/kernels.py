# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What each kernel of the test matrix must give, written down from knowledge of that kernel.

Not derived from the code under test: from each kernel's configuration and source (its
mark_victim tracepoint's format, CONFIG_KPROBES, the kfuncs and helpers it has). A test
asserts the exact expectation on a known kernel and only the invariants elsewhere.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import subprocess
from dataclasses import dataclass

TP_BTF = 'tp_btf/mark_victim'
RAW_TP = 'raw_tracepoint/mark_victim'
KILL_KPROBE = 'kprobe/__oom_kill_process'
KPROBE = 'kprobe/oom_kill_process'
TRACEPOINT = 'tracepoint/oom/mark_victim'


@dataclass(frozen=True)
class Kernel:
    name: str
    kprobes: bool  # CONFIG_KPROBES
    task_tracepoint: bool  # mark_victim passes the task, with the memory fields (6.9, or a backport)
    core_hooks: tuple[str, ...]  # what the CO-RE probe attaches
    bcc_hooks: tuple[str, ...]  # what the BCC probe attaches
    # How hash maps are counted: 'iterator' (one pass with bpf_map_sum_elem_count, 6.6+),
    # 'element_iterator' (iter/bpf_map_elem per map, 5.9+), 'batch' (BPF_MAP_LOOKUP_BATCH, 5.6+).
    entry_counting: str
    # And maps of maps, where the element iterator does not walk them.
    maps_of_maps_counting: str = 'batch'
    for_each: bool = True  # bpf_for_each_map_elem (5.13+)
    ring_buffer: bool = True  # BPF ring buffers (5.8+)
    # Debian's perf_event_paranoid level 3 lets CAP_PERFMON open perf events (which tracepoints and
    # kprobes attach through) from 6.x; Debian 11's 5.10 patch lets only CAP_SYS_ADMIN.
    perfmon_opens_perf_events: bool = True
    program_iterator: bool = True  # iter/bpf_prog (5.9+): programs read in one pass
    verified_instructions: bool = True  # bpf_prog_info.verified_insns (5.16+)
    # bpf_map_lookup_percpu_elem (5.19+): the program iterator sums the per-CPU run-time counters.
    run_counters_in_iterator: bool = True
    # bpf_link_info's missed counts for kprobe perf links and kprobe_multi links (6.7+).
    kprobe_link_missed: bool = False
    # Before 6.2 (SPLIT_RSS_COUNTING) each thread keeps up to 64 page faults' worth of its RSS
    # changes to itself and hands them to the process's counters every 64 faults or when it exits.
    rss_cached_per_thread: bool = False
    page_kb: int = 4  # the page size it was built for (arm64: 4, 16 or 64 kB)
    # A map's memory is charged to its creator's memory cgroup (5.11+, CONFIG_MEMCG_KMEM).
    maps_charged_to_memcg: bool = True
    # Tracepoints and kprobes attached by a perf event link (5.15+), not only by the perf event's ioctl.
    perf_event_links: bool = True
    # bpf_link_info of a perf event link says what it probes: function, tracepoint, file (6.6+).
    perf_event_link_info: bool = True
    tcx: bool = True  # tcx links on interfaces (6.6+)
    # Programs of the eBPF stats probe that this build refuses at load (by their hook), measured.
    refused: frozenset[str] = frozenset()
    # Whether `refused` was measured on this very build; a rebuild of the same version known only by
    # its series (current()) may refuse more or less: tests then accept either, said by the probe.
    refusals_measured: bool = True

    def refuses(self, hook: str) -> bool | None:
        """Whether this kernel refuses the program of `hook`; None where that was not measured."""
        return hook in self.refused if self.refusals_measured else None


# This project's machines: no kprobes, no fentry; 6.18 has the kfunc and the full tracepoint. The
# machines change builds of it over time (the -fc-vN suffix): the series is known by its version.
PROJECT_MACHINE = Kernel(
    name='6.18 (the project machine)',
    kprobes=False,
    task_tracepoint=True,
    core_hooks=(TP_BTF,),
    bcc_hooks=(RAW_TP,),
    entry_counting='iterator',
    kprobe_link_missed=True,  # in bpf_link_info, though this kernel has no kprobes to count
)
# Builds from v1252 on refuse, with EPERM before verification, the iterators that hand a program
# another map's elements (iter/bpf_map_elem, bpf_sk_storage_map, sockmap; measured 2026-12-06, on
# v1252 and v1272); every other iterator loads. v657 loaded them all.
MAP_ELEMENTS_REFUSED = dataclasses.replace(PROJECT_MACHINE, refused=frozenset({'iter/bpf_map_elem'}))

KNOWN: dict[str, Kernel] = {
    '6.18.44-fc-v657': PROJECT_MACHINE,
    '6.18.44-fc-v1252': MAP_ELEMENTS_REFUSED,
    '6.18.44-fc-v1272': MAP_ELEMENTS_REFUSED,
    # Debian 12: the full tracepoint backported in 6.1.130; kprobes; no kfunc (6.6).
    '6.1.0-56-amd64': Kernel(
        name='6.1 Debian 12 x86-64',
        perf_event_link_info=False,
        tcx=False,
        kprobes=True,
        task_tracepoint=True,
        core_hooks=(TP_BTF, KPROBE),
        bcc_hooks=(RAW_TP, KPROBE),
        entry_counting='element_iterator',
        rss_cached_per_thread=True,
    ),
    # The same on arm64.
    '6.1.0-56-arm64': Kernel(
        name='6.1 Debian 12 arm64',
        perf_event_link_info=False,
        tcx=False,
        kprobes=True,
        task_tracepoint=True,
        core_hooks=(TP_BTF, KPROBE),
        bcc_hooks=(RAW_TP, KPROBE),
        entry_counting='element_iterator',
        rss_cached_per_thread=True,
    ),
    # Debian 11's first 5.10: mark_victim passes only a pid (the fields came in 5.10.235), so the
    # kprobe on __oom_kill_process (a function of its own there) sees each victim; no
    # bpf_for_each_map_elem (5.13), no kfunc; hash-of-maps has no batch ops yet (ENOTSUPP).
    '5.10.0-32-amd64': Kernel(
        name='5.10 Debian 11 x86-64',
        kprobes=True,
        task_tracepoint=False,
        core_hooks=(KILL_KPROBE, KPROBE),
        bcc_hooks=(KILL_KPROBE, KPROBE),
        entry_counting='element_iterator',
        maps_of_maps_counting='get_next_key',
        for_each=False,
        perfmon_opens_perf_events=False,
        run_counters_in_iterator=False,  # no bpf_map_lookup_percpu_elem (5.19)
        verified_instructions=False,
        rss_cached_per_thread=True,
        maps_charged_to_memcg=False,  # memlock rlimit accounting until 5.11
        perf_event_links=False,
        perf_event_link_info=False,
        tcx=False,
    ),
    # Debian 13: the full tracepoint, kprobes, and the kfunc (6.6).
    '6.12.118+deb13-amd64': Kernel(
        name='6.12 Debian 13 x86-64',
        kprobes=True,
        task_tracepoint=True,
        core_hooks=(TP_BTF, KPROBE),
        bcc_hooks=(RAW_TP, KPROBE),
        entry_counting='iterator',
        kprobe_link_missed=True,  # 6.7+: kprobe links say the runs they missed
    ),
}
# The same kernel for arm64 with 16 kB pages (Debian's arm64-16k flavour).
KNOWN['6.12.118+deb13-arm64-16k'] = dataclasses.replace(
    KNOWN['6.12.118+deb13-amd64'], name='6.12 Debian 13 arm64, 16 kB pages', page_kb=16
)


# A release's series: the release without its build number, for builds made over time of one version.
_BUILD_SUFFIX = re.compile(r'^(?P<series>\d+\.\d+\.\d+-fc)-v\d+$')


def series(release: str) -> str | None:
    match = _BUILD_SUFFIX.match(release)
    return match.group('series') if match else None


def lookup(release: str) -> Kernel | None:
    """The expectations of a release: its own row; for a new build of a known series, the series'
    features with its refusals not measured (either is accepted, and the probe must say it)."""
    if release in KNOWN:
        return KNOWN[release]
    wanted = series(release)
    builds = [kernel for known, kernel in KNOWN.items() if wanted is not None and series(known) == wanted]
    if not builds:
        return None
    return dataclasses.replace(builds[-1], name=f'{builds[-1].name}, build {release}', refusals_measured=False)


def current() -> Kernel | None:
    """The running kernel's expectations, or None on a kernel not in the table (assert invariants only)."""
    return lookup(os.uname().release)


# --- Facts of a kernel not in the table, from the kernel itself (never from the code under test) ---


def has_kprobes() -> bool | None:
    """CONFIG_KPROBES: as the table says, else as the kernel's own config says; None if neither tells."""
    kernel = current()
    if kernel is not None:
        return kernel.kprobes
    try:
        with gzip.open('/proc/config.gz', 'rt') as f:
            return any(line.strip() == 'CONFIG_KPROBES=y' for line in f)
    except OSError:
        return None


def offers_ring_buffer() -> bool:
    """BPF ring buffers: as the table says, else as bpftool's probe of the kernel finds."""
    kernel = current()
    if kernel is not None:
        return kernel.ring_buffer
    shown = subprocess.run(['bpftool', 'feature', 'probe', 'kernel'], capture_output=True, text=True).stdout
    return 'eBPF map_type ringbuf is available' in shown


def mark_victim_passes_the_task() -> bool:
    """mark_victim with the task and its memory fields: as the table says, else as the kernel's own
    description of the tracepoint (its tracefs format file) shows them."""
    kernel = current()
    if kernel is not None:
        return kernel.task_tracepoint
    for tracefs in ('/sys/kernel/tracing', '/sys/kernel/debug/tracing'):
        try:
            with open(f'{tracefs}/events/oom/mark_victim/format') as f:
                return 'total_vm' in f.read()
        except OSError:
            continue
    raise AssertionError('mark_victim has no format file to read: mount tracefs (the test above did)')
