# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Every program and map in the kernel, with the figures bpf_prog_info and bpf_map_info give.

Two ways, the same numbers (bpftool's):
- one pass of an iter/bpf_prog and of an iter/bpf_map program: the kernel hands over every
  object's fields, with no file descriptor per object (5.9+; run-time counters 5.19+);
- object by object, as bpftool does (get-next-id, fd by id, info by fd, close at once), where the
  kernel has no such iterators or they could not be loaded.

What an iterator cannot give is asked once per object and kept by id: an object never changes
under its id, and ids are not reused before the id space wraps. That is a program name the
kernel cut at 15 characters (the full one is in the program's BTF), the JIT size of a program
made of several functions, and the memory of a map (`memlock` in fdinfo) whose memory does not
change with its contents. Maps whose memory does (maps allocated element by element, tries...)
are read every run.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Callable

from datadog_checks.ebpf_probe.kernel import btf, libbpf
from datadog_checks.ebpf_probe.kernel.uapi import BPF_OBJ_NAME_LEN

from .entries import COUNTED_MAP_TYPES, ONE_PASS_ITERATOR, EntryCounter
from .records import MapRecord, ProgramRecord

# bpf/ebpf_stats.h
PROG_RECORD = struct.Struct('<II8s16sIIIIIIQQQQII')  # struct prog_record
MAP_RECORD = struct.Struct('<IIIIII16sQqqQII')  # struct map_record
PROG_RUN_RECORD = struct.Struct('<IIQQ')  # struct prog_run_record
PROG_RUN_STATS, PROG_DEVICE, PROG_MAPS_CUT, PROG_VERIFIED_INSNS = 1, 2, 4, 8
MAP_MEMCG_KNOWN = 1
NOT_COUNTED = -1
PAGE_SIZE = os.sysconf('SC_PAGE_SIZE')

# Map types whose memory (6.4+: the map's own mem_usage) does not change with what they hold, when
# preallocated: arrays of every kind, preallocated hash maps, stacks, queues, ring buffers, bloom
# filters, local storage (kernel/bpf/*: *_mem_usage). Others (BPF_F_NO_PREALLOC hash maps, LPM
# tries, devmap and sockmap hashes, types newer than this list) are read every run.
FIXED_MEMORY_MAP_TYPES = frozenset(
    {
        1,  # hash (preallocated)
        2,  # array
        3,  # prog_array
        4,  # perf_event_array
        5,  # percpu_hash (preallocated)
        6,  # percpu_array
        7,  # stack_trace
        8,  # cgroup_array
        9,  # lru_hash (always preallocated)
        10,  # lru_percpu_hash
        12,  # array_of_maps
        13,  # hash_of_maps (preallocated)
        14,  # devmap
        15,  # sockmap
        16,  # cpumap
        17,  # xskmap
        19,  # cgroup_storage
        20,  # reuseport_sockarray
        21,  # percpu_cgroup_storage
        22,  # queue
        23,  # stack
        24,  # sk_storage
        26,  # struct_ops
        27,  # ringbuf
        28,  # inode_storage
        29,  # task_storage
        30,  # bloom_filter
        31,  # user_ringbuf
        32,  # cgrp_storage
    }
)
BPF_F_NO_PREALLOC = 1


def memory_is_fixed(map_type: int, flags: int) -> bool:
    """Whether a map's memory stays what it was when it was made."""
    return map_type in FIXED_MEMORY_MAP_TYPES and not flags & BPF_F_NO_PREALLOC


RING_BUFFER_TYPES = frozenset({27, 31})  # ringbuf, user_ringbuf


def ring_buffer_used(fd: int) -> int | None:
    """A ring buffer's unread bytes from its own pages (consumer position, then producer position a
    page further), mapped read-only: what the iterator reads in the kernel, for the object-by-object path."""
    try:
        with mmap.mmap(fd, 2 * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as pages:
            consumer, producer = struct.unpack_from('<Q', pages, 0)[0], struct.unpack_from('<Q', pages, PAGE_SIZE)[0]
    except (OSError, ValueError):
        return None
    return producer - consumer


def memlock(fd: int) -> int | None:
    """`memlock:` of /proc/self/fdinfo/<fd>: the memory the kernel charges for a program or map."""
    try:
        info = os.open(f'/proc/self/fdinfo/{fd}', os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(info, 4096)
    finally:
        os.close(info)
    start = text.find(b'\nmemlock:')
    if start < 0:
        return None
    value = text[start + 9 : text.find(b'\n', start + 9)].strip()
    return int(value) if value.isdigit() else None


def _name(raw: bytes) -> str:
    return raw.split(b'\0', 1)[0].decode('utf-8', 'backslashreplace')


def parse_programs(data: bytes) -> list[tuple]:
    """The iter/bpf_prog output: (PROG_RECORD fields..., map ids) per program."""
    records = []
    position, end, size = 0, len(data), PROG_RECORD.size
    unpack = PROG_RECORD.unpack_from
    while position + size <= end:
        fields = unpack(data, position)
        position += size
        count = fields[9]
        map_ids = struct.unpack_from(f'<{count}I', data, position) if count else ()
        position += 4 * count
        records.append((*fields, map_ids))
    return records


def parse_maps(data: bytes) -> list[tuple]:
    return list(MAP_RECORD.iter_unpack(data[: len(data) - len(data) % MAP_RECORD.size]))


def parse_run_counters(data: bytes) -> dict[int, tuple[int, int]] | None:
    """program id -> (run_time_ns, run_cnt); None when the iterator could not read the counters."""
    counters = {}
    for prog_id, flags, run_time_ns, run_cnt in PROG_RUN_RECORD.iter_unpack(data[: len(data) - len(data) % 24]):
        if not flags & PROG_RUN_STATS:
            return None
        counters[prog_id] = (run_time_ns, run_cnt)
    return counters


class TypeNames:
    """libbpf's names of program and map types, asked once per type."""

    def __init__(self) -> None:
        self._programs: dict[int, str] = {}
        self._maps: dict[int, str] = {}

    def program(self, type_id: int) -> str:
        name = self._programs.get(type_id)
        if name is None:
            name = self._programs[type_id] = libbpf.prog_type_name(type_id)
        return name

    def map(self, type_id: int) -> str:
        name = self._maps.get(type_id)
        if name is None:
            name = self._maps[type_id] = libbpf.map_type_name(type_id)
        return name


def _with_fd(kind: str, object_id: int, read: Callable[[int], object]) -> object | None:
    """read(fd) for the object with this id; None if it went away meanwhile."""
    fd = libbpf.fd_by_id(kind, object_id)
    if fd is None:
        return None
    try:
        return read(fd)
    except libbpf.LibbpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    finally:
        os.close(fd)


class Inventory:
    """Reads every program and map, from the iterators when given, else object by object.

    programs_iter / maps_iter: the list_programs and list_maps(_count) iterators, or None;
    run_counters_iter: program_stats, where it can read the run-time counters.
    """

    def __init__(
        self,
        counter: EntryCounter,
        programs_iter: libbpf.Link | None = None,
        maps_iter: libbpf.Link | None = None,
        run_counters_iter: libbpf.Link | None = None,
        run_counters: bool = True,
    ):
        self._counter = counter
        self._run_counters = run_counters  # False: run time is not collected, no fd per program for it
        self._programs_iter = programs_iter
        self._maps_iter = maps_iter
        self._run_counters_iter = run_counters_iter
        self._types = TypeNames()
        # (id, tag) -> (full name, JIT size, map ids or None): asked once per program that needs it.
        self._program_extras: dict[tuple[int, bytes], tuple[str, int, tuple[int, ...] | None]] = {}
        self._program_memory: dict[int, int | None] = {}  # per object: programs' memlock never changes
        self._map_memory: dict[int, int | None] = {}  # maps whose memory is fixed (memory_is_fixed)

    # --- programs -------------------------------------------------------------------------------

    def programs(self) -> tuple[list[ProgramRecord], dict[int, int] | None]:
        """Every program (owners left empty), and their reference counts (None without the iterator)."""
        if self._programs_iter is None:
            return self._programs_by_fd(), None
        records: list[ProgramRecord] = []
        refcounts: dict[int, int] = {}
        seen_extras = set()
        program_type = self._types.program
        for (
            prog_id,
            type_id,
            tag,
            raw_name,
            insns,
            jited_len,
            func_cnt,
            pages,
            verified,
            _nr_map_ids,
            refcnt,
            run_time_ns,
            run_cnt,
            misses,
            flags,
            _pad,
            map_ids,
        ) in parse_programs(libbpf.read_iterator(self._programs_iter)):
            name = _name(raw_name)
            if (
                func_cnt
                or flags & (PROG_DEVICE | PROG_MAPS_CUT)
                or len(raw_name.split(b'\0', 1)[0]) >= BPF_OBJ_NAME_LEN - 1
            ):
                key = (prog_id, tag)
                extras = self._program_extras.get(key)
                if extras is None:
                    extras = _with_fd('prog', prog_id, self._extras)  # type: ignore[assignment]
                    if extras is None:
                        continue  # gone meanwhile
                    self._program_extras[key] = extras
                seen_extras.add(key)
                name, jited_len, all_map_ids = extras
                if all_map_ids is not None:
                    map_ids = all_map_ids
            if not flags & PROG_RUN_STATS and self._run_counters:
                info = _with_fd('prog', prog_id, libbpf.prog_info)
                if info is None:
                    continue
                run_time_ns, run_cnt, misses = info.run_time_ns, info.run_cnt, info.recursion_misses  # type: ignore[attr-defined]
            elif not flags & PROG_RUN_STATS:
                misses = None  # not read here without an fd per program, which only run time pays for
            refcounts[prog_id] = refcnt
            records.append(
                ProgramRecord(
                    prog_id,
                    name,
                    program_type(type_id),
                    tag.hex(),
                    insns * 8,
                    jited_len,
                    verified if flags & PROG_VERIFIED_INSNS else None,
                    pages * PAGE_SIZE,
                    run_time_ns,
                    run_cnt,
                    misses,
                    map_ids,
                    (),
                    False,
                )
            )
        for key in self._program_extras.keys() - seen_extras:
            del self._program_extras[key]
        return records, refcounts

    @staticmethod
    def _extras(fd: int) -> tuple[str, int, tuple[int, ...] | None]:
        """What only an fd tells of a program: its full name, its JIT size, and all its map ids."""
        info = libbpf.prog_info(fd)
        name = _name(info.name)
        if len(info.name) >= BPF_OBJ_NAME_LEN - 1:
            name = btf.program_function_name(fd, info) or name
        return name, info.jited_prog_len, tuple(libbpf.prog_map_ids(fd, info.nr_map_ids))

    def _programs_by_fd(self) -> list[ProgramRecord]:
        records = []
        seen_extras = set()
        memory_seen = set()
        for prog_id, fd in libbpf.open_objects('prog'):
            try:
                info = libbpf.prog_info(fd)
                tag = bytes(info.tag)
                name = _name(info.name)
                if len(info.name) >= BPF_OBJ_NAME_LEN - 1:
                    key = (prog_id, tag)
                    extras = self._program_extras.get(key)
                    if extras is None:
                        full = btf.program_function_name(fd, info) or name
                        extras = self._program_extras[key] = (full, info.jited_prog_len, None)
                    seen_extras.add(key)
                    name = extras[0]
                map_ids = tuple(libbpf.prog_map_ids(fd, info.nr_map_ids))
                if prog_id not in self._program_memory:
                    self._program_memory[prog_id] = memlock(fd)
                memory_seen.add(prog_id)
            except libbpf.LibbpfError as e:
                if e.errno == errno.ENOENT:
                    continue  # gone meanwhile
                raise
            records.append(
                ProgramRecord(
                    prog_id,
                    name,
                    self._types.program(info.type),
                    tag.hex(),
                    info.xlated_prog_len,
                    info.jited_prog_len,
                    info.verified_insns if info.knows('verified_insns') else None,
                    self._program_memory[prog_id],
                    info.run_time_ns,
                    info.run_cnt,
                    info.recursion_misses,
                    map_ids,
                    (),
                    False,
                )
            )
        for key in self._program_extras.keys() - seen_extras:
            del self._program_extras[key]
        for prog_id in self._program_memory.keys() - memory_seen:
            del self._program_memory[prog_id]
        return records

    def run_counters(self) -> dict[int, tuple[int, int]]:
        """program id -> (run_time_ns, run_cnt), as cheaply as the kernel allows (around statistics windows)."""
        if self._run_counters_iter is not None:
            counters = parse_run_counters(libbpf.read_iterator(self._run_counters_iter))
            if counters is not None:
                return counters
        counters = {}
        for prog_id, fd in libbpf.open_objects('prog'):
            try:
                info = libbpf.prog_info(fd)
            except libbpf.LibbpfError as e:
                if e.errno == errno.ENOENT:
                    continue
                raise
            counters[prog_id] = (info.run_time_ns, info.run_cnt)
        return counters

    # --- maps -----------------------------------------------------------------------------------

    def maps(self) -> tuple[list[MapRecord], dict[int, int] | None]:
        """Every map (owners left empty), and their reference counts (None without the iterator)."""
        if self._maps_iter is None:
            return self._maps_by_fd(), None
        records: list[MapRecord] = []
        refcounts: dict[int, int] = {}
        map_type = self._types.map
        for (
            map_id,
            type_id,
            key_size,
            value_size,
            max_entries,
            flags,
            raw_name,
            refcnt,
            entries,
            ring_used,
            memcg_id,
            map_flags,
            _,
        ) in parse_maps(libbpf.read_iterator(self._maps_iter)):
            count, method = None, None
            memory = self._known_map_memory(map_id, type_id, flags)
            counted = type_id in COUNTED_MAP_TYPES
            if counted and entries != NOT_COUNTED:
                count, method = entries, ONE_PASS_ITERATOR
            if memory is None or (counted and entries == NOT_COUNTED):
                fd = libbpf.fd_by_id('map', map_id)
                if fd is None:
                    continue  # gone meanwhile
                try:
                    if memory is None:
                        memory = self._read_map_memory(map_id, fd, type_id, flags)
                    if counted and entries == NOT_COUNTED:
                        count, method = self._counter.count(fd, libbpf.map_info(fd))
                except libbpf.LibbpfError as e:
                    if e.errno == errno.ENOENT:
                        continue
                    raise
                finally:
                    os.close(fd)
            refcounts[map_id] = refcnt
            records.append(
                MapRecord(
                    map_id,
                    _name(raw_name),
                    map_type(type_id),
                    type_id,
                    key_size,
                    value_size,
                    max_entries,
                    flags,
                    memory,
                    count,
                    method,
                    ring_buffer_used=None if ring_used == NOT_COUNTED else ring_used,
                    memory_cgroup_id=memcg_id if map_flags & MAP_MEMCG_KNOWN else None,
                )
            )
        self._forget_map_memory(records)
        return records, refcounts

    def _maps_by_fd(self) -> list[MapRecord]:
        records = []
        for map_id, fd in libbpf.open_objects('map'):
            try:
                info = libbpf.map_info(fd)
                memory = self._known_map_memory(map_id, info.type, info.map_flags)
                if memory is None:
                    memory = self._read_map_memory(map_id, fd, info.type, info.map_flags)
                count, method = None, None
                if info.type in COUNTED_MAP_TYPES:
                    count, method = self._counter.count(fd, info)
                ring_used = ring_buffer_used(fd) if info.type in RING_BUFFER_TYPES else None
            except libbpf.LibbpfError as e:
                if e.errno == errno.ENOENT:
                    continue  # gone meanwhile
                raise
            records.append(
                MapRecord(
                    map_id,
                    _name(info.name),
                    self._types.map(info.type),
                    info.type,
                    info.key_size,
                    info.value_size,
                    info.max_entries,
                    info.map_flags,
                    memory,
                    count,
                    method,
                    ring_buffer_used=ring_used,  # the memory cgroup: the iterator's only (None: not known)
                )
            )
        self._forget_map_memory(records)
        return records

    def _known_map_memory(self, map_id: int, type_id: int, flags: int) -> int | None:
        """A map's memory read before, if it cannot have changed since (None: read it from an fd)."""
        return self._map_memory.get(map_id) if memory_is_fixed(type_id, flags) else None

    def _read_map_memory(self, map_id: int, fd: int, type_id: int, flags: int) -> int | None:
        memory = memlock(fd)
        if memory_is_fixed(type_id, flags):
            self._map_memory[map_id] = memory
        return memory

    def _forget_map_memory(self, records: list[MapRecord]) -> None:
        """Drop what was kept for maps that are gone (an id is not reused before the id space wraps)."""
        for map_id in self._map_memory.keys() - {r.id for r in records}:
            del self._map_memory[map_id]
