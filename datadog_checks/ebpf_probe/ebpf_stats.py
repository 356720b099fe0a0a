# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The eBPF accounting probe: every program and map on the host, with owners and entry counts.

Same life cycle as the OOM-kill probe: a factory loads it (its BPF iterators,
CO-RE), get_and_flush() returns typed records, close() releases everything,
including the BPF_ENABLE_STATS fd that keeps run-time statistics on.

Programs and maps are enumerated the way bpftool does it (get-next-id, fd by
id, info by fd, close at once; an object gone meanwhile is skipped). Entry
counts come from one pass of an iter/bpf_map program calling the
bpf_map_sum_elem_count kfunc (6.6+): the cost grows with the number of maps,
not with their entries. Without it, each hash-family map is counted on its
own, bounded: bpf_for_each_map_elem through BPF_PROG_TEST_RUN (5.13+), then
BPF_MAP_LOOKUP_BATCH, then get_next_key.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import kernel, libbpf
from .kernel import RequirementError
from .resources import bpf_file

STATS_OBJECT = 'ebpf_stats.bpf.o'
MAP_COUNT_OBJECT = 'map_count.bpf.o'

# enum bpf_map_type values whose element count means something: the hash family.
MAP_TYPE_HASH = 1
MAP_TYPE_PERCPU_HASH = 5
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LRU_PERCPU_HASH = 10
MAP_TYPE_HASH_OF_MAPS = 13
COUNTED_MAP_TYPES = frozenset(
    {MAP_TYPE_HASH, MAP_TYPE_PERCPU_HASH, MAP_TYPE_LRU_HASH, MAP_TYPE_LRU_PERCPU_HASH, MAP_TYPE_HASH_OF_MAPS}
)
PERCPU_MAP_TYPES = frozenset({MAP_TYPE_PERCPU_HASH, MAP_TYPE_LRU_PERCPU_HASH})

MAP_ENTRIES_RECORD = struct.Struct('<IIq')  # struct map_entries_record
OWNER_RECORD = struct.Struct('<6I16s')  # struct owner_record
OWNED_MAP, OWNED_PROG, OWNED_LINK = 1, 2, 3

# Bounds of the per-map fallbacks.
BATCH_BUFFER_BYTES = 4 << 20  # keys + values per BPF_MAP_LOOKUP_BATCH call
MAX_PINNED_FILES = 10_000
# errno values of an operation the kernel does not have (ENOTSUPP is the kernel-internal 524).
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})


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


@dataclass(frozen=True)
class EbpfStatsOptions:
    collect_program_runtime: bool = True
    # Tests only: leave out some iterators ('map_entries', 'bpf_owners') to exercise the fallbacks.
    disabled_iterators: frozenset[str] = frozenset()


def fdinfo(fd: int, pid: int | str = 'self') -> dict[str, str]:
    """The key: value lines of /proc/<pid>/fdinfo/<fd>."""
    result = {}
    try:
        with open(f'/proc/{pid}/fdinfo/{fd}') as f:
            for line in f:
                key, _, value = line.partition(':')
                result[key.strip()] = value.strip()
    except OSError:
        pass
    return result


def _memlock(fd: int) -> int | None:
    value = fdinfo(fd).get('memlock')
    return int(value) if value and value.isdigit() else None


def _possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values hold one slot each)."""
    try:
        with open('/sys/devices/system/cpu/possible') as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    total = 0
    for part in text.split(','):
        low, _, high = part.partition('-')
        total += int(high or low) - int(low) + 1
    return total


class EntryCounter:
    """Counts one hash-family map's entries without the kfunc, bounded by max_entries."""

    def __init__(self, map_count_object: Path | None):
        self._map_count_object = map_count_object
        self._for_each_error: str | None = None
        self._batch_error: str | None = None

    def count(self, fd: int, info: libbpf.BpfMapInfo) -> tuple[int | None, str | None]:
        if self._map_count_object is not None and self._for_each_error is None:
            try:
                return self.count_for_each(fd), 'for_each'
            except (libbpf.LibbpfError, OSError) as e:
                self._for_each_error = str(e)  # an older kernel: not retried for every map
        if self._batch_error is None:
            try:
                n = self.count_batch(fd, info)
                if n is not None:
                    return n, 'batch'
            except libbpf.LibbpfError as e:
                if e.errno in _UNSUPPORTED:
                    self._batch_error = str(e)  # no batch operations in this kernel: not retried
        n = self.count_next_key(fd, info)
        return (n, 'get_next_key') if n is not None else (None, None)

    def count_for_each(self, fd: int) -> int:
        """bpf_for_each_map_elem through BPF_PROG_TEST_RUN, a program loaded for this map only."""
        obj = libbpf.BpfObject(str(self._map_count_object))
        try:
            obj.reuse_map_fd('count_target', fd)
            obj.load()
            return libbpf.prog_test_run(obj.program_fd('count_with_for_each'))
        finally:
            obj.close()

    @staticmethod
    def count_batch(fd: int, info: libbpf.BpfMapInfo) -> int | None:
        """BPF_MAP_LOOKUP_BATCH over the whole map; None if the walk restarted (the map changed under it)."""
        value_size = (info.value_size + 7) // 8 * 8 * _possible_cpus() if info.type in PERCPU_MAP_TYPES else (
            info.value_size
        )  # fmt: skip
        per_element = info.key_size + value_size
        batch = max(1, min(info.max_entries or 1, BATCH_BUFFER_BYTES // max(per_element, 1)))
        keys = ctypes.create_string_buffer(info.key_size * batch)
        values = ctypes.create_string_buffer(value_size * batch)
        token_size = max(info.key_size, 8)
        in_token = ctypes.create_string_buffer(token_size)
        out_token = ctypes.create_string_buffer(token_size)
        total = 0
        first = True
        while True:
            try:
                n, done = libbpf.map_lookup_batch(
                    fd, None if first else in_token, out_token, keys, values, batch
                )  # fmt: skip
            except libbpf.LibbpfError as e:
                if e.errno == errno.ENOSPC and batch < info.max_entries:
                    # A bucket holds more elements than the batch: the walk cannot go on with this size.
                    return None
                raise
            total += n
            if done:
                return total
            if total > info.max_entries:
                return None
            ctypes.memmove(in_token, out_token, token_size)
            first = False

    @staticmethod
    def count_next_key(fd: int, info: libbpf.BpfMapInfo) -> int | None:
        """get_next_key from the first key; None if it walks more keys than the map can hold (a restart)."""
        key = ctypes.create_string_buffer(max(info.key_size, 1))
        next_key = ctypes.create_string_buffer(max(info.key_size, 1))
        total = 0
        current = None
        while libbpf.map_get_next_key(fd, current, next_key):
            total += 1
            if total > info.max_entries:
                return None
            ctypes.memmove(key, next_key, info.key_size)
            current = key
        return total


class EbpfStatsProbe:
    """eBPF accounting of the whole host. Needs CAP_SYS_ADMIN (listing objects by id)."""

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
        # What works in a degraded way, said once by the check.
        self.limitations: list[str] = []
        self._counter = EntryCounter(None)

    @classmethod
    def load(cls, options: EbpfStatsOptions, log: logging.Logger | logging.LoggerAdapter) -> EbpfStatsProbe:
        caps = kernel.effective_capabilities()
        if not caps & (1 << kernel.CAP_SYS_ADMIN):
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
                self._stats_fd = libbpf.enable_stats(libbpf.BPF_STATS_RUN_TIME)
                self.hooks.append('BPF_ENABLE_STATS')
            except libbpf.LibbpfError as e:
                self.limitations.append(f'program run time is not collected: BPF_ENABLE_STATS failed: {e}')

        want_entries, want_owners = self._iterator_plan()
        map_count = bpf_file(MAP_COUNT_OBJECT)
        self._counter = EntryCounter(map_count if map_count.exists() else None)
        if not (want_entries or want_owners):
            return
        path = bpf_file(STATS_OBJECT)
        if not path.exists():
            self.limitations.append(f'the BPF iterators are not loaded: {path} is missing (build it with make bpf)')
            return
        try:
            obj = libbpf.BpfObject(str(path))
            self._obj = obj
            obj.set_autoload('map_entries', want_entries)
            obj.set_autoload('bpf_owners', want_owners)
            obj.load()
            if want_entries:
                self._map_iter = obj.attach_iter('map_entries')
                self.hooks.append('iter/bpf_map')
            if want_owners:
                self._owner_iter = obj.attach_iter('bpf_owners')
                self.hooks.append('iter/task_file')
        except (libbpf.LibbpfError, OSError) as e:
            log.debug('eBPF accounting iterators failed to load', exc_info=True)
            self._close_object()
            self.limitations.append(
                f'the BPF iterators could not be loaded ({e}): map entries are counted map by map and owners '
                'read from /proc'
            )

    def _iterator_plan(self) -> tuple[bool, bool]:
        disabled = self._options.disabled_iterators
        want_entries = want_owners = False
        if not kernel.has_vmlinux_btf():
            self.rejected_hooks['iter/bpf_map'] = self.rejected_hooks['iter/task_file'] = 'the kernel has no BTF'
            self.limitations.append(
                'the kernel has no BTF: map entries are counted map by map and owners read from /proc'
            )
            return False, False
        try:
            btf = kernel.VmlinuxBtf()
        except (OSError, ValueError) as e:
            self.rejected_hooks['iter/bpf_map'] = self.rejected_hooks['iter/task_file'] = f'unreadable BTF: {e}'
            self.limitations.append(f'the kernel BTF is unreadable ({e}): maps are counted map by map')
            return False, False
        with btf:
            if 'map_entries' in disabled:
                self.rejected_hooks['iter/bpf_map'] = 'disabled by the probe options'
            elif not btf.has_function('bpf_map_sum_elem_count'):
                self.rejected_hooks['iter/bpf_map'] = 'the kernel has no bpf_map_sum_elem_count kfunc (6.6+)'
                self.limitations.append(
                    'the kernel has no bpf_map_sum_elem_count kfunc (6.6+): hash maps are counted map by map'
                )
            elif not btf.has_struct('bpf_iter__bpf_map'):
                self.rejected_hooks['iter/bpf_map'] = 'the kernel has no bpf_map iterator (5.8+)'
            else:
                want_entries = True
            if 'bpf_owners' in disabled:
                self.rejected_hooks['iter/task_file'] = 'disabled by the probe options'
            elif not btf.has_struct('bpf_iter__task_file'):
                self.rejected_hooks['iter/task_file'] = 'the kernel has no task_file iterator (5.8+)'
                self.limitations.append('the kernel has no task_file iterator (5.8+): owners are read from /proc')
            else:
                want_owners = True
        return want_entries, want_owners

    @property
    def run_time_stats(self) -> bool:
        return self._stats_fd is not None

    # --- collection -------------------------------------------------------------

    def get_and_flush(self) -> EbpfSnapshot:
        """Every program and map in the kernel now, with owners and entry counts."""
        with self._lock:
            owners, link_programs = self._owners()
            entries = self._iterator_entries()
            pinned = PinnedObjects()  # walks bpffs only if some object has no holder
            programs = self._programs(owners, link_programs, pinned)
            maps = self._maps(owners, entries, pinned, programs)
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
                if len(info.name) >= libbpf.BPF_OBJ_NAME_LEN - 1:
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


def owner_records_from_iterator(data: bytes) -> list[tuple[int, int, int, int, str]]:
    """(tgid, kind, id, link's program id, comm) from the task_file iterator's output."""
    records = []
    for i in range(0, len(data) - OWNER_RECORD.size + 1, OWNER_RECORD.size):
        tgid, _fd, kind, object_id, link_prog_id, _pad, comm = OWNER_RECORD.unpack_from(data, i)
        records.append((tgid, kind, object_id, link_prog_id, comm.split(b'\0', 1)[0].decode('utf-8', 'replace')))
    return records


_ANON_KINDS = {'anon_inode:bpf-map': OWNED_MAP, 'anon_inode:bpf-prog': OWNED_PROG, 'anon_inode:bpf_link': OWNED_LINK}
_ID_KEYS = {OWNED_MAP: 'map_id', OWNED_PROG: 'prog_id', OWNED_LINK: 'link_id'}


def owner_records_from_proc(proc: str = '/proc') -> list[tuple[int, int, int, int, str]]:
    """The same from /proc/*/fd and fdinfo: slower (every fd of every process), for kernels without iterators."""
    records = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f'{proc}/{pid}/fd')
            with open(f'{proc}/{pid}/comm') as f:
                comm = f.read().strip()
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                kind = _ANON_KINDS.get(os.readlink(f'{proc}/{pid}/fd/{fd}'))
            except OSError:
                continue
            if kind is None:
                continue
            info = fdinfo(int(fd), pid)
            object_id = info.get(_ID_KEYS[kind], '')
            if not object_id.isdigit():
                continue
            link_prog = info.get('prog_id', '0') if kind == OWNED_LINK else '0'
            records.append((pid, kind, int(object_id), int(link_prog) if link_prog.isdigit() else 0, comm))
    return records


def bpffs_mounts(mounts: str = '/proc/self/mounts') -> list[str]:
    try:
        with open(mounts) as f:
            return [line.split()[1] for line in f if len(line.split()) > 2 and line.split()[2] == 'bpf']
    except OSError:
        return []


class PinnedObjects:
    """`(kind, id) in pinned`, with bpffs walked on the first question only."""

    def __init__(self) -> None:
        self._pinned: set[tuple[int, int]] | None = None

    def __contains__(self, key: tuple[int, int]) -> bool:
        if self._pinned is None:
            self._pinned = pinned_objects()
        return key in self._pinned


def pinned_objects() -> set[tuple[int, int]]:
    """(kind, id) of every object pinned in a mounted bpffs (bounded)."""
    pinned: set[tuple[int, int]] = set()
    seen = 0
    for mount in bpffs_mounts():
        for folder, _dirs, files in os.walk(mount):
            for name in files:
                seen += 1
                if seen > MAX_PINNED_FILES:
                    return pinned
                try:
                    fd = libbpf.obj_get(os.path.join(folder, name))
                except libbpf.LibbpfError:
                    continue
                try:
                    info = fdinfo(fd)
                finally:
                    os.close(fd)
                # A pinned link also keeps its program (prog_id in the link's fdinfo).
                for kind, key in ((OWNED_PROG, 'prog_id'), (OWNED_MAP, 'map_id'), (OWNED_LINK, 'link_id')):
                    if info.get(key, '').isdigit():
                        pinned.add((kind, int(info[key])))
    return pinned
