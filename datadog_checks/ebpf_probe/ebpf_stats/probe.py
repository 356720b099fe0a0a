# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The eBPF stats probe: every program and map on the host, with owners and entry counts.

Same life cycle as the OOM-kill probe: a factory loads it (its BPF iterators, CO-RE),
snapshot() returns typed records, close() releases everything, including the
BPF_ENABLE_STATS fd that keeps run-time statistics on.

Programs and maps are enumerated the way bpftool does it (get-next-id, fd by id, info by
fd, close at once; an object gone meanwhile is skipped). Entry counts come from one pass of
an iter/bpf_map program calling the bpf_map_sum_elem_count kfunc (6.6+): the cost grows
with the number of maps, not with their entries. Without it, each hash-family map is
counted on its own (entries.py).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

from datadog_checks.ebpf_probe.kernel import libbpf, requirements
from datadog_checks.ebpf_probe.kernel.btf import Btf, has_vmlinux_btf
from datadog_checks.ebpf_probe.kernel.requirements import RequirementError
from datadog_checks.ebpf_probe.kernel.uapi import BPF_OBJ_NAME_LEN
from datadog_checks.ebpf_probe.resources import bpf_file

from .entries import COUNTED_MAP_TYPES, ELEMENT_ITERATOR, FOR_EACH, EntryCounter, Walk
from .owners import (
    OWNED_LINK,
    OWNED_MAP,
    OWNED_PROG,
    PinnedObjects,
    fdinfo,
    owner_records_from_iterator,
    owner_records_from_proc,
)
from .records import EbpfSnapshot, MapRecord, Owner, ProgramRecord

STATS_OBJECT = 'ebpf_stats.bpf.o'
MAP_COUNT_OBJECT = 'map_count.bpf.o'
# The programs of STATS_OBJECT, and the names the probe shows them by.
ITERATORS = {'map_entries': 'iter/bpf_map', 'map_elements': 'iter/bpf_map_elem', 'bpf_owners': 'iter/task_file'}
MAP_ENTRIES_RECORD = struct.Struct('<IIq')  # struct map_entries_record (bpf/ebpf_stats.h)


@dataclass(frozen=True)
class EbpfStatsOptions:
    collect_program_runtime: bool = True
    # Tests only: leave out some counting programs (of ITERATORS, and 'map_count') to exercise the fallbacks.
    disabled_iterators: frozenset[str] = frozenset()


def _memlock(fd: int) -> int | None:
    value = fdinfo(fd).get('memlock')
    return int(value) if value and value.isdigit() else None


class EbpfStatsProbe:
    """Every eBPF program and map of the host. Needs CAP_SYS_ADMIN (listing objects by id)."""

    variant = 'co-re'
    core_error: str | None = None

    def __init__(self, options: EbpfStatsOptions):
        self._options = options
        self._lock = threading.Lock()
        self._obj: libbpf.BpfObject | None = None
        self._map_iter: libbpf.Link | None = None
        self._owner_iter: libbpf.Link | None = None
        self._stats_fd: int | None = None
        self._names: dict[tuple[int, str], str] = {}  # (id, tag) -> full name
        self.hooks: list[str] = []
        self.rejected_hooks: dict[str, str] = {}
        # What works in a degraded way, said once by the check (some are learnt while running).
        self.limitations: list[str] = []
        self._counter = EntryCounter({}, {})
        self._for_each_unavailable = ''  # why bpf_for_each_map_elem cannot count here

    @classmethod
    def load(cls, options: EbpfStatsOptions, log: logging.Logger | logging.LoggerAdapter) -> EbpfStatsProbe:
        caps = requirements.effective_capabilities()
        if not caps & (1 << requirements.CAP_SYS_ADMIN):
            raise RequirementError(
                'missing capability CAP_SYS_ADMIN: listing every eBPF program and map on the host needs it '
                '(the kernel allows BPF_*_GET_NEXT_ID only with CAP_SYS_ADMIN)'
            )
        probe = cls(options)
        try:
            probe._load(log)
        except BaseException:
            probe.close()
            raise
        return probe

    def _load(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        if self._options.collect_program_runtime:
            try:
                self._stats_fd = libbpf.enable_stats()
                self.hooks.append('BPF_ENABLE_STATS')
            except libbpf.LibbpfError as e:
                self.limitations.append(f'program run time is not collected: BPF_ENABLE_STATS failed: {e}')
        wanted = self._iterator_plan()
        path = bpf_file(STATS_OBJECT)
        if any(wanted.values()) and not path.exists():
            self.limitations.append(f'the BPF iterators are not loaded: {path} is missing (build it with make bpf)')
            wanted = dict.fromkeys(wanted, False)
        if any(wanted.values()):
            try:
                obj = libbpf.BpfObject(str(path))
                self._obj = obj
                for program, want in wanted.items():
                    obj.set_autoload(program, want)
                obj.load()
                if wanted['map_entries']:
                    self._map_iter = obj.attach_iter('map_entries')
                if wanted['bpf_owners']:
                    self._owner_iter = obj.attach_iter('bpf_owners')
                self.hooks += [ITERATORS[program] for program, want in wanted.items() if want]
            except (libbpf.LibbpfError, OSError) as e:
                log.debug('eBPF stats iterators failed to load', exc_info=True)
                self._close_object()
                wanted = dict.fromkeys(wanted, False)
                self.limitations.append(
                    f'the BPF iterators could not be loaded ({e}): map entries are counted map by map and owners '
                    'read from /proc'
                )
        walks: dict[str, Walk] = {}
        unavailable: dict[str, str] = {}
        if wanted['map_elements']:
            walks[ELEMENT_ITERATOR] = self._walk_elements
        else:
            unavailable[ELEMENT_ITERATOR] = self.rejected_hooks.get(ITERATORS['map_elements'], 'not loaded')
        if self._for_each_unavailable:
            unavailable[FOR_EACH] = self._for_each_unavailable
        else:
            walks[FOR_EACH] = self._walk_for_each
        self._counter = EntryCounter(walks, unavailable)

    def _walk_elements(self, fd: int) -> int:
        assert self._obj is not None
        return struct.unpack('<Q', self._obj.read_map_iterator('map_elements', fd))[0]

    @staticmethod
    def _walk_for_each(fd: int) -> int:
        """bpf_for_each_map_elem over one map: a program loaded for it, run once, freed."""
        obj = libbpf.BpfObject(str(bpf_file(MAP_COUNT_OBJECT)))
        try:
            obj.map('count_target').reuse_fd(fd)
            obj.load()
            return libbpf.prog_test_run(obj.program_fd('count_with_for_each'))
        finally:
            obj.close()

    def _iterator_plan(self) -> dict[str, bool]:
        """Which iterator programs to load: program -> wanted."""
        wanted = dict.fromkeys(ITERATORS, False)
        disabled = self._options.disabled_iterators

        def reject(program: str, why: str) -> None:
            self.rejected_hooks[ITERATORS[program]] = why

        if not has_vmlinux_btf():
            self._for_each_unavailable = 'the kernel has no BTF to tell whether it has bpf_for_each_map_elem'
            for program in ITERATORS:
                reject(program, 'the kernel has no BTF')
            self.limitations.append(
                'the kernel has no BTF: map entries are counted map by map and owners read from /proc'
            )
            return wanted
        try:
            btf = Btf.open()
        except (OSError, ValueError) as e:
            self._for_each_unavailable = f'unreadable BTF: {e}'
            for program in ITERATORS:
                reject(program, f'unreadable BTF: {e}')
            self.limitations.append(f'the kernel BTF is unreadable ({e}): maps are counted map by map')
            return wanted
        with btf:
            if 'map_entries' in disabled:
                reject('map_entries', 'disabled by the probe options')
            elif not btf.has_function('bpf_map_sum_elem_count'):
                reject('map_entries', 'the kernel has no bpf_map_sum_elem_count kfunc (6.6+)')
                self.limitations.append(
                    'the kernel has no bpf_map_sum_elem_count kfunc (6.6+): hash maps are counted map by map'
                )
            elif not btf.has_struct('bpf_iter__bpf_map'):
                reject('map_entries', 'the kernel has no bpf_map iterator (5.8+)')
            else:
                wanted['map_entries'] = True
            if wanted['map_entries']:
                reject('map_elements', 'not needed: the kernel counts every map in one pass')
            elif 'map_elements' in disabled:
                reject('map_elements', 'disabled by the probe options')
            elif not btf.has_struct('bpf_iter__bpf_map_elem'):
                reject('map_elements', 'the kernel has no map element iterator (5.9+)')
            else:
                wanted['map_elements'] = True
            if not btf.has_function('bpf_for_each_map_elem'):
                self._for_each_unavailable = 'the kernel has no bpf_for_each_map_elem (5.13+)'
            elif 'map_count' in disabled:
                self._for_each_unavailable = 'disabled by the probe options'
            elif not bpf_file(MAP_COUNT_OBJECT).exists():
                self._for_each_unavailable = f'{bpf_file(MAP_COUNT_OBJECT)} is missing (build it with make bpf)'
            if 'bpf_owners' in disabled:
                reject('bpf_owners', 'disabled by the probe options')
            elif not btf.has_struct('bpf_iter__task_file'):
                reject('bpf_owners', 'the kernel has no task_file iterator (5.8+)')
                self.limitations.append('the kernel has no task_file iterator (5.8+): owners are read from /proc')
            else:
                wanted['bpf_owners'] = True
        return wanted

    @property
    def run_time_stats(self) -> bool:
        return self._stats_fd is not None

    # --- collection -------------------------------------------------------------

    def snapshot(self) -> EbpfSnapshot:
        """Every program and map in the kernel now, with owners and entry counts."""
        with self._lock:
            owners, link_programs = self._owners()
            entries = self._iterator_entries()
            pinned = PinnedObjects()  # walks bpffs only if some object has no holder
            programs = self._programs(owners, link_programs, pinned)
            maps = self._maps(owners, entries, pinned, programs)
            for limitation in self._counter.unavailable():
                if limitation not in self.limitations:
                    self.limitations.append(limitation)
            return EbpfSnapshot(time.monotonic(), programs, maps, self.run_time_stats)

    def _iterator_entries(self) -> dict[int, int]:
        if self._map_iter is None:
            return {}
        data = libbpf.read_iterator(self._map_iter)
        return {
            map_id: count
            for map_id, _, count in (MAP_ENTRIES_RECORD.unpack_from(data, i) for i in range(0, len(data), 16))
        }

    def _owners(self) -> tuple[dict[tuple[int, int], set[Owner]], dict[int, set[Owner]]]:
        """(kind, id) -> processes holding an fd to it, and program id -> holders of links to it."""
        if self._owner_iter is not None:
            records = owner_records_from_iterator(libbpf.read_iterator(self._owner_iter))
        else:
            records = owner_records_from_proc()
        owners: dict[tuple[int, int], set[Owner]] = {}
        link_programs: dict[int, set[Owner]] = {}
        for tgid, kind, object_id, link_prog_id, comm in records:
            owner = Owner(tgid, comm)
            owners.setdefault((kind, object_id), set()).add(owner)
            if kind == OWNED_LINK and link_prog_id:
                link_programs.setdefault(link_prog_id, set()).add(owner)
        return owners, link_programs

    def _programs(
        self,
        owners: dict[tuple[int, int], set[Owner]],
        link_programs: dict[int, set[Owner]],
        pinned: PinnedObjects,
    ) -> list[ProgramRecord]:
        records = []
        seen_names = set()
        for prog_id, fd in libbpf.open_objects('prog'):
            try:
                info = libbpf.prog_info(fd)
                tag = bytes(info.tag).hex()
                name = info.name.decode('utf-8', 'backslashreplace')
                if len(info.name) >= BPF_OBJ_NAME_LEN - 1:
                    key = (prog_id, tag)
                    if key not in self._names:
                        self._names[key] = libbpf.prog_btf_func_name(fd, info) or name
                    name = self._names[key]
                    seen_names.add(key)
                map_ids = tuple(libbpf.prog_map_ids(fd, info.nr_map_ids))
                memory = _memlock(fd)
            except libbpf.LibbpfError as e:
                if e.errno == errno.ENOENT:
                    continue  # gone meanwhile
                raise
            holders = owners.get((OWNED_PROG, prog_id), set()) | link_programs.get(prog_id, set())
            records.append(
                ProgramRecord(
                    id=prog_id,
                    name=name,
                    type=libbpf.prog_type_name(info.type),
                    tag=tag,
                    translated_bytes=info.xlated_prog_len,
                    jited_bytes=info.jited_prog_len,
                    verified_instructions=info.verified_insns,
                    memory_bytes=memory,
                    run_time_ns=info.run_time_ns,
                    run_count=info.run_cnt,
                    recursion_misses=info.recursion_misses,
                    map_ids=map_ids,
                    owners=tuple(sorted(holders)),
                    pinned=not holders and (OWNED_PROG, prog_id) in pinned,
                )
            )
        for key in set(self._names) - seen_names:
            del self._names[key]
        return records

    def _maps(
        self,
        owners: dict[tuple[int, int], set[Owner]],
        entries: dict[int, int],
        pinned: PinnedObjects,
        programs: list[ProgramRecord],
    ) -> list[MapRecord]:
        # A map nobody holds an fd to belongs to whoever holds the programs that use it.
        users: dict[int, set[Owner]] = {}
        for program in programs:
            for map_id in program.map_ids:
                users.setdefault(map_id, set()).update(program.owners)
        records = []
        for map_id, fd in libbpf.open_objects('map'):
            try:
                info = libbpf.map_info(fd)
                memory = _memlock(fd)
                count, method = None, None
                if info.type in COUNTED_MAP_TYPES:
                    if map_id in entries:
                        count, method = entries[map_id], 'iterator'
                    else:
                        count, method = self._counter.count(fd, info)
            except libbpf.LibbpfError as e:
                if e.errno == errno.ENOENT:
                    continue  # gone meanwhile
                raise
            holders = owners.get((OWNED_MAP, map_id)) or users.get(map_id, set())
            records.append(
                MapRecord(
                    id=map_id,
                    name=info.name.decode('utf-8', 'backslashreplace'),
                    type=libbpf.map_type_name(info.type),
                    type_id=info.type,
                    key_size=info.key_size,
                    value_size=info.value_size,
                    max_entries=info.max_entries,
                    flags=info.map_flags,
                    memory_bytes=memory,
                    entries=count,
                    entries_method=method,
                    owners=tuple(sorted(holders)),
                    pinned=not holders and (OWNED_MAP, map_id) in pinned,
                )
            )
        return records

    # --- life cycle ------------------------------------------------------------

    def _close_object(self) -> None:
        self._map_iter = self._owner_iter = None
        if self._obj is not None:
            self._obj.close()  # destroys the iterator links too
            self._obj = None

    def close(self) -> None:
        with self._lock:
            self._close_object()
            if self._stats_fd is not None:
                os.close(self._stats_fd)  # run-time statistics go off with the last such fd
                self._stats_fd = None
