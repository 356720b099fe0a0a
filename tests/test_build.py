# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The BPF objects build for each CPU the fleet runs: x86-64 and arm64, with this machine's clang."""

import re
import subprocess
from pathlib import Path

import pytest

from datadog_checks.ebpf_probe.kernel import libbpf

REPO = Path(__file__).resolve().parent.parent
OBJECTS = ('oom_kill.bpf.o', 'ebpf_stats.bpf.o', 'map_count.bpf.o')
# Where BPF_KPROBE finds the first argument in the kprobe's pt_regs: rdi on x86-64, x0 on arm64.
FIRST_ARGUMENT_OFFSET = {'x86': 14 * 8, 'arm64': 0}

pytestmark = pytest.mark.build  # clang and make: this machine's toolchain


def first_context_read(obj: Path) -> int:
    """The offset of the kprobe program's first read of its context (the probed function's first argument)."""
    listing = subprocess.run(
        ['llvm-objdump', '-d', '--section=kprobe/oom_kill_process', str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # The context pointer arrives in r1; the program may read through it there or keep it in another register.
    context = {'r1', *re.findall(r'(r\d+) = r1\n', listing)}
    reads = re.findall(r'= \*\(u64 \*\)\((r\d+) \+ (\d+)\)', listing)
    return next(int(offset) for register, offset in reads if register in context)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['x86', 'arm64'])
def test_make_bpf_builds_the_objects_for_each_architecture(tmp_path, arch):
    out = tmp_path / arch
    subprocess.run(['make', '-C', str(REPO), '--no-print-directory', 'bpf', f'ARCH={arch}', f'BPF_OUT={out}'],
                   check=True, capture_output=True)  # fmt: skip
    for name in OBJECTS:
        assert (out / name).stat().st_size > 0
        obj = libbpf.BpfObject(str(out / name))  # a valid BPF ELF with its BTF, as libbpf reads it
        obj.close()
    assert first_context_read(out / 'oom_kill.bpf.o') == FIRST_ARGUMENT_OFFSET[arch]
