# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the eBPF stats probe reports of each program and map (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Owner:
    pid: int
    comm: str


@dataclass(frozen=True)
class ProgramRecord:
    id: int
    name: str  # full name (from BTF when the kernel's 15-character name is cut)
    type: str  # as bpftool names it: kprobe, tracing, socket_filter...
    tag: str
    translated_bytes: int
    jited_bytes: int
    verified_instructions: int
    memory_bytes: int | None  # memlock, from /proc/self/fdinfo
    run_time_ns: int
    run_count: int
    recursion_misses: int
    map_ids: tuple[int, ...]
    owners: tuple[Owner, ...]
    pinned: bool  # held by a pin in bpffs; looked up only for objects no process holds


@dataclass(frozen=True)
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
    owners: tuple[Owner, ...]
    pinned: bool  # held by a pin in bpffs; looked up only for objects no process holds

    @property
    def occupancy(self) -> float | None:
        if self.entries is None or not self.max_entries:
            return None
        return self.entries / self.max_entries


@dataclass
class EbpfSnapshot:
    timestamp: float  # time.monotonic() of the collection
    programs: list[ProgramRecord] = field(default_factory=list)
    maps: list[MapRecord] = field(default_factory=list)
    run_time_stats: bool = False  # BPF_ENABLE_STATS is held: run_time_ns/run_count advance
