# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Where the kernel-side files are: packaged under data/bpf in a wheel, or in the source tree."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_FOLDERS = (PACKAGE_DIR / 'data' / 'bpf', PACKAGE_DIR.parent.parent / 'bpf')


def bpf_file(name: str) -> Path:
    """A compiled object (data/bpf, built by make bpf) or a BCC source (bpf/ in the tree, data/bpf in a wheel)."""
    for folder in _FOLDERS:
        if (folder / name).exists():
            return folder / name
    return _FOLDERS[0] / name
