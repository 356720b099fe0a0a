# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Cgroups by the kernel's id: the path of a cgroup a BPF program or a link names.

The kernel names a cgroup by its kernfs node's id, which is also the inode number of its
directory in the cgroup filesystem (64-bit kernels, 5.5+). Paths come from a walk of the
hierarchy, made again only when an id not seen before is asked for. The host's hierarchy is
looked for where the Agent's container mounts it (/host/sys/fs/cgroup) before this process's own
view, which a cgroup namespace may cut down to its own subtree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from . import features

CGROUP_MOUNTS = ('/host/sys/fs/cgroup', '/sys/fs/cgroup')


def memory_hierarchy(mounts: Iterable[str] = CGROUP_MOUNTS) -> str | None:
    """Where the memory controller's cgroups are: the unified hierarchy (v2), else v1's memory mount."""
    if features.memory_cgroup_v2():
        return unified_hierarchy(mounts)
    for base in mounts:
        root = os.path.join(base, 'memory')
        if os.path.exists(os.path.join(root, 'cgroup.procs')):
            return root
    return None


def unified_hierarchy(mounts: Iterable[str] = CGROUP_MOUNTS) -> str | None:
    """Where the cgroup v2 hierarchy is (what cgroup BPF programs attach to), beside v1 ('unified') or alone."""
    for base in mounts:
        for root in (base, os.path.join(base, 'unified')):
            if os.path.exists(os.path.join(root, 'cgroup.controllers')):
                return root
    return None


def memory_cgroup_id(pid: int | str, root: str | None, proc: str = '/proc') -> int:
    """A process's memory cgroup id (its directory's inode under root), from /proc/<pid>/cgroup; 0 if not known."""
    if root is None:
        return 0
    try:
        with open(f'{proc}/{pid}/cgroup') as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    v1 = [line.split(':', 2)[2] for line in lines if 'memory' in line.split(':', 2)[1].split(',')]
    path = v1[0] if v1 else next((line.split(':', 2)[2] for line in lines if line.startswith('0::')), None)
    if path is None:
        return 0
    try:
        return os.stat(root + path.rstrip('/')).st_ino if path != '/' else os.stat(root).st_ino
    except OSError:
        return 0


class CgroupPaths:
    """Cgroup id -> path below the hierarchy's root ('/' for the root)."""

    def __init__(self, root: str | None):
        self.root = root
        self._paths: dict[int, str] = {}
        self._unknown: set[int] = set()  # ids no walk found: outside this view, or gone

    def path(self, cgroup_id: int) -> str | None:
        """The cgroup's path; None when it is not in the hierarchy this process sees, or gone."""
        path = self._paths.get(cgroup_id)
        if path is None and cgroup_id not in self._unknown and self.root is not None:
            self._paths = self._walk(self.root)
            self._unknown -= self._paths.keys()
            path = self._paths.get(cgroup_id)
            if path is None:
                self._unknown.add(cgroup_id)  # not looked for again until a walk for another id finds it
        return path

    def paths(self, ids: Iterable[int]) -> dict[int, str | None]:
        return {i: self.path(i) for i in ids}

    @staticmethod
    def _walk(root: str) -> dict[int, str]:
        found: dict[int, str] = {}
        try:
            found[os.stat(root).st_ino] = '/'
        except OSError:
            return found
        stack = [(root, '')]
        while stack:
            directory, relative = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue  # removed meanwhile
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    path = f'{relative}/{entry.name}'
                    found[entry.inode()] = path
                    stack.append((entry.path, path))
        return found
