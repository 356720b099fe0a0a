# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the eBPF stats probe reports of each program and map (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .attachments import Attachment


@dataclass(frozen=True, order=True)
class Owner:
    pid: int
    comm: str
    # Its memory cgroup (the directory's inode; 0: not known), for its container's or service's tags.
    memory_cgroup_id: int = field(default=0, compare=False)


# Records are made by the thousand every run: slots, not frozen (frozen dataclasses are slow to build).
@dataclass(slots=True)
class ProgramRecord:
    id: int
    name: str  # full name (from BTF when the kernel's 15-character name is cut)
    type: str  # as bpftool names it: kprobe, tracing, socket_filter...
    tag: str
    translated_bytes: int
    jited_bytes: int
    verified_instructions: int | None  # None: the kernel does not count them (before 5.16)
    memory_bytes: int | None  # memlock
    run_time_ns: int
    run_count: int
    recursion_misses: int | None  # None: not read (before 5.19, without run-time statistics)
    map_ids: tuple[int, ...]
    owners: tuple[Owner, ...]
    pinned: bool  # held by a pin in bpffs; looked up only for objects no process holds
    # Runs its kprobe links skipped (the kernel's missed count, 6.7+); None: no kprobe link, or not known here.
    kprobe_misses: int | None = None
    # Where its links attach it; empty: no link (attached another way, or not attached).
    attachments: tuple[Attachment, ...] = ()


@dataclass(slots=True)
class MapRecord:
    id: int
    name: str
    type: str
    type_id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    memory_bytes: int | None
    entries: int | None  # None where a count would not be true (arrays, ring buffers...) or was not possible
    entries_method: str | None  # 'iterator', 'for_each', 'batch', 'get_next_key'
    owners: tuple[Owner, ...] = ()  # filled in by the owners' pass
    pinned: bool = False  # held by a pin in bpffs; looked up only for objects no process holds
    # A ring buffer's bytes written and not yet read (its size is max_entries); None: not a ring buffer, or not read.
    ring_buffer_used: int | None = None
    # The memory cgroup its memory is charged to (id: the cgroup directory's inode), 0 for none (the root);
    # None where the kernel does not charge maps to cgroups (before 5.11) or it was not read.
    memory_cgroup_id: int | None = None

    @property
    def occupancy(self) -> float | None:
        if self.entries is None or not self.max_entries:
            return None
        return self.entries / self.max_entries

    @property
    def ring_buffer_fill(self) -> float | None:
        """How full a ring buffer is (0 to 1)."""
        if self.ring_buffer_used is None or not self.max_entries:
            return None
        return self.ring_buffer_used / self.max_entries


@dataclass(frozen=True)
class RunTimeCoverage:
    """How much of the interval that ends with a snapshot the kernel counted program run time in.

    fraction: the share of the interval statistics were on (the counters' deltas are that share of
    what ran); None when they were on all along (held by the probe, or turned on by the sysctl or
    by someone else, which the probe noticed): the deltas are the interval's own.
    """

    fraction: float | None
    source: str  # 'held', 'sampled', 'sysctl' or 'external'

    @property
    def scale(self) -> float | None:
        """What to multiply run time and run counts by for the whole interval; None: nothing was counted."""
        if self.fraction is None:
            return 1.0
        if self.fraction <= 0:
            return None
        return 1.0 / min(self.fraction, 1.0)


ALWAYS_COUNTED = RunTimeCoverage(None, 'held')  # statistics held on for the check's whole life


@dataclass
class EbpfSnapshot:
    timestamp: float  # time.monotonic() of the collection
    programs: list[ProgramRecord] = field(default_factory=list)
    maps: list[MapRecord] = field(default_factory=list)
    # When run time and run counts advanced since the previous snapshot; None: run-time statistics are not collected.
    run_time: RunTimeCoverage | None = None
    # The memory cgroups maps are charged to: id -> path in the memory hierarchy (None: not visible here).
    memory_cgroups: dict[int, str | None] = field(default_factory=dict)
