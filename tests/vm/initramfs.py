# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""A `newc` cpio writer for the per-run overlay (the kernel unpacks concatenated archives in order,
a later file replacing an earlier one), and the packing of whole trees with GNU cpio."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import BinaryIO


class Cpio:
    """Entries in the order given: a directory must come before what it holds."""

    def __init__(self, out: BinaryIO, mtime: int = 0):
        self.out = out
        self.mtime = mtime
        self.inode = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b'', rdev: tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.encode() + b'\0'
        fields = [self.inode, mode, 0, 0, 1, self.mtime, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0]
        self.inode += 1
        header = b'070701' + b''.join(b'%08X' % value for value in fields)
        self.out.write(header + name_bytes + b'\0' * (-(len(header) + len(name_bytes)) % 4))
        self.out.write(data + b'\0' * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        """The directory and its parents (once each)."""
        parts = name.strip('/').split('/')
        for i in range(1, len(parts) + 1):
            path = '/'.join(parts[:i])
            if path and path not in self.dirs:
                self.dirs.add(path)
                self._entry(path, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip('/')
        if '/' in name:
            self.directory(name.rsplit('/', 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip('/')
        if '/' in name:
            self.directory(name.rsplit('/', 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip('/')
        if '/' in name:
            self.directory(name.rsplit('/', 1)[0])
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def tree(self, source: Path, name: str, skip=lambda relative: False) -> None:
        """A folder of the host under `name`: files, folders and links (modes kept, owner root)."""
        self.directory(name)
        for path in sorted(source.rglob('*')):
            relative = path.relative_to(source)
            if skip(relative):
                continue
            target = f'{name}/{relative}'
            if path.is_symlink():
                self.symlink(target, os.readlink(path))
            elif path.is_dir():
                self.directory(target)
            else:
                self.file(target, path.read_bytes(), stat.S_IMODE(path.stat().st_mode))

    def close(self) -> None:
        self._entry('TRAILER!!!', 0)


def pack_tree(root: Path, archive: Path, paths: list[str] | None = None, exclude: tuple[str, ...] = ()) -> None:
    """A whole folder (or the listed paths of it, relative, parents first) as one newc archive."""
    if paths is None:
        prune = ' -o '.join(f'-path ./{p}' for p in exclude)
        find = f'find . \\( {prune} \\) -prune -o -print' if exclude else 'find .'
        listing = subprocess.run(find, shell=True, cwd=root, capture_output=True, check=True).stdout
    else:
        listing = ''.join(f'{p}\n' for p in paths).encode()
    tmp = archive.with_suffix('.tmp')
    with open(tmp, 'wb') as out:
        subprocess.run(['cpio', '-o', '-H', 'newc', '--quiet'], cwd=root, input=listing, stdout=out, check=True)
    tmp.rename(archive)
