# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Who holds each eBPF object: processes (file descriptors), or only a pin in bpffs.

Finding holders means visiting every file descriptor of every process (the task_file iterator,
else /proc): a cost that grows with the host's open files, 100k-1M on busy nodes. Objects live
long and holders rarely change, so OwnerTracker keeps what it found and looks again only when
something says the answer may have changed:
- an object id it has not seen (a new program, map or link: its holder is needed at once);
- a holder that exited (each holding process is watched through a pidfd, one poll per run);
- where the BPF iterators read it, an object's reference count that moved since the scan: a
  process opened or closed a file descriptor to it (also pins, links and programs using a map).
Not noticed until one of those happens: a file descriptor handed to another process (fork,
SCM_RIGHTS) that then changes hands without a close, and a holder renaming itself.
"""

from __future__ import annotations

import logging
import os
import select
import struct
from collections.abc import Callable, Iterable

from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.kernel.cgroups import memory_cgroup_id, memory_hierarchy
from datadog_checks.ebpf_probe.kernel.features import in_host_pid_namespace

from .records import Owner

OWNER_RECORD = struct.Struct('<6I16sQ')  # struct owner_record (bpf/ebpf_stats.h)
OWNED_MAP, OWNED_PROG, OWNED_LINK = 1, 2, 3
MAX_PINNED_FILES = 10_000

# (tgid, kind, object id, a link's program id, comm, memory cgroup id: 0 if not known)
OwnerRecord = tuple[int, int, int, int, str, int]


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
    """The task_file iterator's output (bpf/ebpf_stats.bpf.c: bpf_owners). Pids are the host's; the
    reading process's own files are given its own pid, as it knows itself in its pid namespace."""
    records = []
    own_pid = os.getpid()
    for i in range(0, len(data) - OWNER_RECORD.size + 1, OWNER_RECORD.size):
        tgid, _fd, kind, object_id, link_prog_id, reader, comm, memcg_id = OWNER_RECORD.unpack_from(data, i)
        pid = own_pid if reader else tgid
        name = comm.split(b'\0', 1)[0].decode('utf-8', 'replace')
        records.append((pid, kind, object_id, link_prog_id, name, memcg_id))
    return records


_ANON_KINDS = {'anon_inode:bpf-map': OWNED_MAP, 'anon_inode:bpf-prog': OWNED_PROG, 'anon_inode:bpf_link': OWNED_LINK}
_ID_KEYS = {OWNED_MAP: 'map_id', OWNED_PROG: 'prog_id', OWNED_LINK: 'link_id'}


def owner_records_from_proc(proc: str = '/proc') -> list[OwnerRecord]:
    """The same from /proc/*/fd and fdinfo: slower (every fd of every process), for kernels without iterators."""
    records = []
    hierarchy = memory_hierarchy()
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
        memcg_id = None  # read once per process, for its first BPF file
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
            if memcg_id is None:
                memcg_id = memory_cgroup_id(pid, hierarchy, proc)
            records.append((pid, kind, int(object_id), int(link_prog) if link_prog.isdigit() else 0, comm, memcg_id))
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


# Holders watched through a pidfd each; beyond this, a holder is checked by its pid alone.
MAX_WATCHED_HOLDERS = 1024


class HolderWatch:
    """Tells, cheaply, whether any of a set of processes exited since they were watched."""

    def __init__(self) -> None:
        self._pidfds: dict[int, int] = {}  # pid -> pidfd
        self._pids: set[int] = set()  # watched by pid alone (no pidfd: too many, or pidfd_open refused)
        self._poll = select.poll()

    def watch(self, pids: Iterable[int]) -> None:
        """Watch exactly these processes from now on."""
        wanted = set(pids)
        for pid in list(self._pidfds):
            if pid not in wanted:
                self._poll.unregister(self._pidfds[pid])
                os.close(self._pidfds.pop(pid))
        self._pids = set()
        for pid in sorted(wanted - self._pidfds.keys()):
            if len(self._pidfds) >= MAX_WATCHED_HOLDERS:
                self._pids.add(pid)
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._pids.add(pid)  # already gone: exited() says so
                continue
            except (OSError, AttributeError):  # no pidfd_open (before 5.3), or refused
                self._pids.add(pid)
                continue
            self._pidfds[pid] = pidfd
            self._poll.register(pidfd, select.POLLIN)

    def exited(self) -> bool:
        """Whether a watched process exited (a pidfd becomes readable when its process exits)."""
        if self._pidfds and self._poll.poll(0):
            return True
        for pid in self._pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # it exists
        return False

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            self._poll.unregister(pidfd)
            os.close(pidfd)
        self._pidfds = {}
        self._pids = set()


class OwnerTracker:
    """Holders of every object, found by a scan only when they may have changed (see the module doc).

    scan: the fd walk, giving owner records (the task_file iterator's, else /proc's).
    Objects are given per kind (OWNED_PROG, OWNED_MAP, OWNED_LINK): no key is made per object per run.
    """

    def __init__(
        self, scan: Callable[[], list[OwnerRecord]], own_pid: int, log: logging.Logger | logging.LoggerAdapter
    ):
        self._scan = scan
        self._own_pid = own_pid
        self._log = log
        self._watch = HolderWatch()
        # Outside the host's pid namespace the holders' (host) pids cannot be watched: their exits
        # show in the objects' reference counts instead.
        self._watch_holders = in_host_pid_namespace()
        self._known: dict[int, set[int]] | None = None  # kind -> ids, at the previous run
        self._refcounts: dict[int, dict[int, int]] = {}  # kind -> id -> references, at the previous run
        self._holders: dict[int, dict[int, tuple[Owner, ...]]] = {}  # kind -> id -> holders
        self._pinned: PinnedObjects = PinnedObjects()

    def _why_scan(self, objects: dict[int, set[int]], refcounts: dict[int, dict[int, int]]) -> str | None:
        if self._known is None:
            return 'first run'
        for kind, ids in objects.items():
            new = ids - self._known.get(kind, set())
            if new:
                return f'{len(new)} new object(s) of kind {kind}'
        if self._watch.exited():
            return 'a holder exited'
        for kind, counts in refcounts.items():
            before = self._refcounts.get(kind)
            if before is not None and counts != before:  # compared one by one only when something differs
                for object_id, count in counts.items():
                    if before.get(object_id, count) != count:
                        return f'references to object {object_id} of kind {kind} changed'
        return None

    def owners(
        self, objects: dict[int, set[int]], refcounts: dict[int, dict[int, int]]
    ) -> tuple[dict[int, dict[int, tuple[Owner, ...]]], PinnedObjects]:
        """(kind -> id -> its holders, pinned objects).

        objects: kind -> the ids of every program, map and link now; refcounts: kind -> id -> the
        object's reference count, where known. A program's holders include those of the links to
        it. Holder tuples are shared between objects with the same holders, and kept between runs
        while nothing changes.
        """
        why = self._why_scan(objects, refcounts)
        if why is not None:
            self._log.debug('Looking for the holders of eBPF objects: %s', why)
            self._rescan()
        self._known = objects
        self._refcounts = refcounts
        return self._holders, self._pinned

    def _rescan(self) -> None:
        held: dict[tuple[int, int], set[Owner]] = {}
        for tgid, kind, object_id, link_prog_id, comm, memcg_id in self._scan():
            owner = Owner(tgid, comm, memcg_id)
            held.setdefault((kind, object_id), set()).add(owner)
            if kind == OWNED_LINK and link_prog_id:
                # Holding a link to a program holds the program.
                held.setdefault((OWNED_PROG, link_prog_id), set()).add(owner)
        interned: dict[frozenset[Owner], tuple[Owner, ...]] = {}
        holders: dict[int, dict[int, tuple[Owner, ...]]] = {OWNED_PROG: {}, OWNED_MAP: {}, OWNED_LINK: {}}
        for (kind, object_id), owners in held.items():
            frozen = frozenset(owners)
            shared = interned.get(frozen)
            if shared is None:
                shared = interned[frozen] = tuple(sorted(owners))
            holders.setdefault(kind, {})[object_id] = shared
        self._holders = holders
        self._pinned = PinnedObjects()  # bpffs walked again, if some object has no holder
        if self._watch_holders:
            self._watch.watch({o.pid for owners in interned for o in owners} - {self._own_pid})

    def close(self) -> None:
        self._watch.close()
