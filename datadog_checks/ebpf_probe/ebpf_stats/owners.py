# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Who holds each eBPF object: processes (file descriptors), or only a pin in bpffs."""

from __future__ import annotations

import os
import struct

from datadog_checks.ebpf_probe.kernel import libbpf

OWNER_RECORD = struct.Struct('<6I16s')  # struct owner_record (bpf/ebpf_stats.h)
OWNED_MAP, OWNED_PROG, OWNED_LINK = 1, 2, 3
MAX_PINNED_FILES = 10_000

# (tgid, kind, object id, a link's program id, comm)
OwnerRecord = tuple[int, int, int, int, str]


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


def owner_records_from_iterator(data: bytes) -> list[OwnerRecord]:
    """The task_file iterator's output (bpf/ebpf_stats.bpf.c: bpf_owners)."""
    records = []
    for i in range(0, len(data) - OWNER_RECORD.size + 1, OWNER_RECORD.size):
        tgid, _fd, kind, object_id, link_prog_id, _pad, comm = OWNER_RECORD.unpack_from(data, i)
        records.append((tgid, kind, object_id, link_prog_id, comm.split(b'\0', 1)[0].decode('utf-8', 'replace')))
    return records


_ANON_KINDS = {'anon_inode:bpf-map': OWNED_MAP, 'anon_inode:bpf-prog': OWNED_PROG, 'anon_inode:bpf_link': OWNED_LINK}
_ID_KEYS = {OWNED_MAP: 'map_id', OWNED_PROG: 'prog_id', OWNED_LINK: 'link_id'}


def owner_records_from_proc(proc: str = '/proc') -> list[OwnerRecord]:
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
