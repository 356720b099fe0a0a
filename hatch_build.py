# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Wheel build hook: put the built binaries of one architecture into the wheel and tag it for it.

They are the bundled libbpf.so.1 (`make bundle`) and the CO-RE objects (`make bpf`), from the
package's data folder, or from the file named by EBPF_PROBE_LIBBPF and the folder named by
EBPF_PROBE_BPF_DIR: `make wheel ARCH=arm64` hands over the cross-built ones. The library's ELF
header says the architecture; its glibc floor (2.28, measured by tests/test_bundle.py) gives
manylinux_2_28.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGED_PATH = 'datadog_checks/ebpf_probe/data/lib/libbpf.so.1'
PACKAGED_BPF = 'datadog_checks/ebpf_probe/data/bpf'
MANYLINUX = 'manylinux_2_28'
# ELF e_machine -> the platform tag's architecture
MACHINES = {62: 'x86_64', 183: 'aarch64'}


def elf_machine(path: Path) -> str:
    header = path.read_bytes()[:20]
    if header[:4] != b'\x7fELF' or header[4] != 2 or header[5] != 1:
        raise ValueError(f'{path} is not a 64-bit little-endian ELF file')
    (machine,) = struct.unpack_from('<H', header, 18)
    if machine not in MACHINES:
        raise ValueError(f'{path} is built for ELF machine {machine}, not one of {sorted(MACHINES.values())}')
    return MACHINES[machine]


class BundledLibbpfHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != 'wheel' or version == 'editable':
            return  # an editable install loads the library from the source tree
        library = Path(os.environ.get('EBPF_PROBE_LIBBPF') or Path(self.root) / PACKAGED_PATH)
        if not library.is_file():
            raise RuntimeError(
                f'{library} is missing: `make bundle` builds it (a wheel without it would need libbpf on the host)'
            )
        build_data['force_include'][str(library)] = PACKAGED_PATH
        # The kprobe reads its arguments from the registers of the architecture it was built for.
        objects = sorted(Path(os.environ.get('EBPF_PROBE_BPF_DIR') or Path(self.root) / PACKAGED_BPF).glob('*.bpf.o'))
        if not objects:
            raise RuntimeError('no CO-RE objects (*.bpf.o): `make bpf` builds them')
        for path in objects:
            build_data['force_include'][str(path)] = f'{PACKAGED_BPF}/{path.name}'
        build_data['pure_python'] = False
        build_data['tag'] = f'py3-none-{MANYLINUX}_{elf_machine(library)}'
