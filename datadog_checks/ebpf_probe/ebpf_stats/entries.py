# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Counting a hash map's entries where the kernel has no bpf_map_sum_elem_count kfunc (before 6.6).

Three ways, best first, chosen per map type (not every way works for every type) and
remembered per kernel: bpf_for_each_map_elem run once through BPF_PROG_TEST_RUN (5.13+),
BPF_MAP_LOOKUP_BATCH (5.6+), then get_next_key. Each is bounded by the map's max_entries,
and a walk that the map's changes threw off gives no count rather than a wrong one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections import OrderedDict
from pathlib import Path

from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.kernel.uapi import (
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_HASH_OF_MAPS,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_HASH,
)

# Map types whose element count means something: the hash family.
COUNTED_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_HASH,
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_LRU_HASH,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_HASH_OF_MAPS,
    }
)
PERCPU_MAP_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH})
# bpf_for_each_map_elem visits these; not maps of maps (kernel/bpf/hashtab.c).
FOR_EACH_MAP_TYPES = COUNTED_MAP_TYPES - {BPF_MAP_TYPE_HASH_OF_MAPS}

FOR_EACH, BATCH, NEXT_KEY = 'for_each', 'batch', 'get_next_key'
BATCH_BUFFER_BYTES = 4 << 20  # keys + values per BPF_MAP_LOOKUP_BATCH call
MAX_COUNT_PROGRAMS = 32  # loaded counting programs kept, one per map shape
_NO_MAP = 0xFFFFFFFF
_ZERO_KEY = struct.pack('<I', 0)
# errno values of an operation the kernel does not have (ENOTSUPP is the kernel-internal 524).
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})

# (map type, key size, value size, flags): maps of one shape share a counting program.
MapShape = tuple[int, int, int, int]


def possible_cpus() -> int:
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


class _ForEachProgram:
    """map_count.bpf.o loaded for one map shape: count_target's inner maps must have that shape."""

    def __init__(self, path: Path, template_fd: int):
        self._obj = libbpf.BpfObject(str(path))
        try:
            self._obj.map('count_target').set_inner_map_fd(template_fd)
            self._obj.load()
            self._slots = self._obj.map('count_target').fd
            self._program = self._obj.program_fd('count_with_for_each')
        except BaseException:
            self._obj.close()
            raise

    def count(self, fd: int) -> int:
        libbpf.map_update_elem(self._slots, _ZERO_KEY, struct.pack('<I', fd))
        try:
            n = libbpf.prog_test_run(self._program)
        finally:
            libbpf.map_delete_elem(self._slots, _ZERO_KEY)  # holds no reference to the map after
        if n == _NO_MAP:
            raise libbpf.LibbpfError('count_with_for_each', errno.ENOENT)
        return n

    def close(self) -> None:
        self._obj.close()


class EntryCounter:
    """Counts one hash-family map's entries, the best way this kernel has for its type."""

    def __init__(self, map_count_object: Path | None):
        self._object = map_count_object
        # (method, map type or None for every type) -> why it cannot be used
        self._unavailable: dict[tuple[str, int | None], str] = {}
        if map_count_object is None:
            self._unavailable[(FOR_EACH, None)] = 'the counting program map_count.bpf.o is missing'
        self._programs: OrderedDict[MapShape, _ForEachProgram] = OrderedDict()
        self.loads = 0  # counting programs loaded (each one verified once)

    def _usable(self, method: str, map_type: int) -> bool:
        return (method, None) not in self._unavailable and (method, map_type) not in self._unavailable

    def unavailable(self) -> list[str]:
        """What cannot be used, and why, for the probe's limitations."""
        return [
            f'{method} counting is unavailable{" for map type " + str(map_type) if map_type is not None else ""}: {why}'
            for (method, map_type), why in self._unavailable.items()
        ]

    def count(self, fd: int, info: libbpf.BpfMapInfo) -> tuple[int | None, str | None]:
        if info.type in FOR_EACH_MAP_TYPES and self._usable(FOR_EACH, info.type):
            try:
                return self.count_for_each(fd, info), FOR_EACH
            except (libbpf.LibbpfError, OSError) as e:
                self._for_each_failed(info, e)
        if self._usable(BATCH, info.type):
            try:
                n = self.count_batch(fd, info)
                return (n, BATCH) if n is not None else (None, None)
            except libbpf.LibbpfError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._unavailable[(BATCH, info.type)] = f'BPF_MAP_LOOKUP_BATCH failed: {e}'
        n = self.count_next_key(fd, info)
        return (n, NEXT_KEY) if n is not None else (None, None)

    def _for_each_failed(self, info: libbpf.BpfMapInfo, error: Exception) -> None:
        if not self._programs and self.loads == 0:
            # The very first load failed: the kernel has no bpf_for_each_map_elem (5.13+).
            self._unavailable[(FOR_EACH, None)] = f'bpf_for_each_map_elem could not be loaded (5.13+): {error}'
        else:
            self._unavailable[(FOR_EACH, info.type)] = f'{error}'

    def count_for_each(self, fd: int, info: libbpf.BpfMapInfo) -> int:
        """bpf_for_each_map_elem through BPF_PROG_TEST_RUN, with the program loaded once per map shape."""
        assert self._object is not None
        shape = (info.type, info.key_size, info.value_size, info.map_flags)
        program = self._programs.get(shape)
        if program is None:
            program = _ForEachProgram(self._object, fd)
            self.loads += 1
            self._programs[shape] = program
            if len(self._programs) > MAX_COUNT_PROGRAMS:
                self._programs.popitem(last=False)[1].close()
        else:
            self._programs.move_to_end(shape)
        return program.count(fd)

    @staticmethod
    def count_batch(fd: int, info: libbpf.BpfMapInfo) -> int | None:
        """BPF_MAP_LOOKUP_BATCH over the whole map; None if the walk went wrong (the map changed under it)."""
        value_size = info.value_size
        if info.type in PERCPU_MAP_TYPES:
            value_size = (info.value_size + 7) // 8 * 8 * possible_cpus()
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
                n, done = libbpf.map_lookup_batch(fd, None if first else in_token, out_token, keys, values, batch)
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
        """get_next_key from the first key; None when the walk restarted.

        A deleted current key makes the kernel restart from the first key: seen again, or more
        keys walked than the map can hold, the count is dropped. A restart after the first key
        itself was deleted goes unseen; only kernels before 5.6 (no batch operations) walk so.
        """
        size = max(info.key_size, 1)
        key = ctypes.create_string_buffer(size)
        next_key = ctypes.create_string_buffer(size)
        first: bytes | None = None
        total = 0
        current = None
        while libbpf.map_get_next_key(fd, current, next_key):
            if first is None:
                first = next_key.raw
            elif next_key.raw == first:
                return None
            total += 1
            if total > info.max_entries:
                return None
            ctypes.memmove(key, next_key, info.key_size)
            current = key
        return total

    def close(self) -> None:
        programs, self._programs = self._programs, OrderedDict()
        for program in programs.values():
            program.close()
