# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Counting a hash map's entries where the kernel has no bpf_map_sum_elem_count kfunc (before 6.6).

The ways, best first, chosen per map (not every way works for every map type; what fails
for a type is remembered for the kernel):
- a walk of the map in the kernel: an iter/bpf_map_elem program (5.9+), loaded once and
  attached to each map in turn; for maps that can hold LARGE_MAP entries or more,
  bpf_for_each_map_elem (5.13+) instead, 4x faster per element, which pays for loading it
  for that map (measured here: 0.06 ms a map and 365 ns an entry for the iterator, 0.2 ms
  a map and 90 ns an entry for bpf_for_each_map_elem);
- BPF_MAP_LOOKUP_BATCH (5.6+), then get_next_key.
Each is bounded by the map's max_entries, and a walk that the map's changes threw off gives
no count rather than a wrong one (see count_next_key for its one blind spot).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

from datadog_checks.ebpf_probe.kernel import libbpf, uapi
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

ONE_PASS_ITERATOR, PER_MAP_ITERATOR, FOR_EACH = 'iterator', 'element_iterator', 'for_each'
BATCH, NEXT_KEY = 'batch', 'get_next_key'
LARGE_MAP = 65536  # max_entries from which bpf_for_each_map_elem is the cheaper walk
# bpf_for_each_map_elem walks these; not maps of maps (kernel/bpf/hashtab.c).
FOR_EACH_MAP_TYPES = COUNTED_MAP_TYPES - {BPF_MAP_TYPE_HASH_OF_MAPS}
BATCH_BUFFER_BYTES = 4 << 20  # keys + values per BPF_MAP_LOOKUP_BATCH call
# errno values of an operation the kernel does not have for a map (ENOTSUPP is the kernel-internal 524).
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})

# Walks one map's elements in the kernel and returns how many it saw (given a map fd).
Walk = Callable[[int], int]


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


class EntryCounter:
    """Counts one hash-family map's entries, the best way this kernel has for it.

    walks: method -> walk for the in-kernel walks the probe could load, unavailable: method ->
    why not, for those it could not.
    """

    def __init__(self, walks: dict[str, Walk], unavailable: dict[str, str]):
        self._walks = walks
        # (method, map type, or None for every type) -> why it cannot be used
        self._unavailable: dict[tuple[str, int | None], str] = {
            (method, None): why for method, why in unavailable.items()
        }

    def _usable(self, method: str, map_type: int) -> bool:
        return (method, None) not in self._unavailable and (method, map_type) not in self._unavailable

    def unavailable(self) -> list[str]:
        """What cannot be used, and why, for the probe's limitations."""
        said = []
        for (method, map_type), why in self._unavailable.items():
            which = f' for map type {libbpf.map_type_name(map_type)}' if map_type is not None else ''
            said.append(f'{method} counting is unavailable{which}: {why}')
        return said

    def count(self, fd: int, info: uapi.BpfMapInfo) -> tuple[int | None, str | None]:
        walks = [PER_MAP_ITERATOR]
        if info.max_entries >= LARGE_MAP and info.type in FOR_EACH_MAP_TYPES:
            walks.insert(0, FOR_EACH)
        for method in walks:
            if method not in self._walks or not self._usable(method, info.type):
                continue
            try:
                return self._walks[method](fd), method
            except libbpf.LibbpfError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._unavailable[(method, info.type)] = f'{e}'
        if self._usable(BATCH, info.type):
            try:
                n = self.count_batch(fd, info)
                return (n, BATCH) if n is not None else (None, None)
            except libbpf.LibbpfError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._unavailable[(BATCH, info.type)] = f'{e}'
        n = self.count_next_key(fd, info)
        return (n, NEXT_KEY) if n is not None else (None, None)

    @staticmethod
    def count_batch(fd: int, info: uapi.BpfMapInfo) -> int | None:
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
    def count_next_key(fd: int, info: uapi.BpfMapInfo) -> int | None:
        """get_next_key from the first key; None when the walk restarted.

        A deleted current key makes the kernel restart from the first key: that key seen again,
        or more keys walked than the map can hold, and the count is dropped. A restart after the
        first key itself was deleted goes unseen; only kernels before 5.6 (no batch operations)
        count this way.
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
