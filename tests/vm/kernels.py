# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel matrix: every VM row, in ONE table.

A row boots one Debian kernel package, pinned by its exact name (so expectations can be keyed on
the exact kernel release, which is the package name without `linux-image-`), with the root of its
architecture (one Debian 12 userland per architecture, shared by every row of it) plus the row's
extra layers, and runs this checkout's tests/ with pytest inside, against the wheel built from the
checkout. See tests/vm/README.md.

Kernel packages leave the archive when Debian replaces them (point releases, security updates):
a row whose package is gone FAILS, naming the package; pick the new one with
`python -m tests.vm.build --candidates ROW` and update the pin here.
"""

from __future__ import annotations

from dataclasses import dataclass

# What every row runs unless told otherwise (`make test-kernels VM_PYTEST='...'` replaces it for every
# row): the test files that meet the kernel, the same ones as on the host. Pure logic (formatting,
# records, metrics) and the package build run on the host only; paths are relative to the checkout.
KERNEL_TESTS = (
    'tests/test_kernel.py',
    'tests/test_oom_kill_probe.py',
    'tests/test_oom_kill_context.py',
    'tests/test_ebpf_stats.py',
    'tests/test_check.py',
    'tests/test_check_ebpf_stats.py',
    'tests/test_cli.py',
    'tests/test_reliability.py',
    'tests/test_memory_killers.py',
    'tests/test_ring_buffers.py',
    'tests/test_map_memory_cgroups.py',
    'tests/test_attachments.py',
)
# Markers of tests that need what not every row has; a row lists those it runs (Row.runs).
# 'slow': long tests (hundreds of cycles, 16-thread victims, drop accounting): one row per architecture
# runs them, since emulated CPUs are slow.
NEEDS = ('bcc', 'kernel_headers', 'system_oom', 'container_runtime', 'minimal_init', 'memory_killer', 'slow')
ALWAYS_LEFT_OUT = ('unit', 'vm')


@dataclass(frozen=True)
class Arch:
    deb: str  # Debian's name: amd64, arm64
    machine: str  # uname -m in the guest
    qemu: str  # the system emulator
    qemu_args: tuple[str, ...]  # machine and CPU (the accelerator is chosen at run time)
    console: str  # the kernel's serial console device
    debian_package: str  # the Debian package holding `qemu`


ARCHES = {
    'amd64': Arch('amd64', 'x86_64', 'qemu-system-x86_64', ('-cpu', 'max'), 'ttyS0', 'qemu-system-x86'),
    # cortex-a57: plain `max` is about twice as slow under TCG (pointer authentication emulated in full).
    'arm64': Arch(
        'arm64', 'aarch64', 'qemu-system-aarch64', ('-M', 'virt', '-cpu', 'cortex-a57'), 'ttyAMA0', 'qemu-system-arm'
    ),
}


@dataclass(frozen=True)
class Row:
    name: str
    arch: str  # a key of ARCHES
    kernel: str  # the exact Debian package: linux-image-<release>
    suite: str  # the Debian suite that has it (a key of SUITES)
    layers: tuple[str, ...] = ()  # extra layers over the root: 'headers', 'bcc', 'podman'
    runs: tuple[str, ...] = ()  # markers of NEEDS this row has what they need for
    files: tuple[str, ...] = KERNEL_TESTS  # the test files it runs
    tests: tuple[str, ...] = ()  # test files added to the selection for this row
    qemu_cpu: str | None = None  # the CPU to emulate, instead of the architecture's
    # (pytest node id, why): tests known to fail on this row. They still run; the row fails if one
    # of them passes (strict), so the table is updated when the cause is fixed.
    expected_failures: tuple[tuple[str, str], ...] = ()
    timeout: int = 1200  # seconds for boot + run
    notes: str = ''

    @property
    def marker_expression(self) -> str:
        left_out = [m for m in NEEDS if m not in self.runs] + list(ALWAYS_LEFT_OUT)
        return ' and '.join(f'not {marker}' for marker in left_out)

    @property
    def release(self) -> str:
        """`uname -r` of the booted kernel."""
        return self.kernel.removeprefix('linux-image-')

    @property
    def headers(self) -> tuple[str, str]:
        """Debian's split kernel headers for this kernel: the flavour's and the common ones."""
        base = self.release.rsplit('-', 1)[0]
        return f'linux-headers-{self.release}', f'linux-headers-{base}-common'


ROWS = (
    Row(
        '5.10',
        'amd64',
        'linux-image-5.10.0-32-amd64',
        'bullseye',
        layers=('headers', 'bcc'),
        runs=('bcc', 'kernel_headers'),
        notes='mark_victim passes only the pid (the fields came with 5.10.235); BCC with this kernel headers',
    ),
    Row(
        '6.1',
        'amd64',
        'linux-image-6.1.0-56-amd64',
        'bookworm-security',
        layers=('earlyoom',),
        runs=('system_oom', 'memory_killer', 'slow'),
        notes="Debian 12's own kernel; a system-wide OOM (the VM is thrown away), earlyoom acting on it; long tests",
    ),
    Row(
        '6.12',
        'amd64',
        'linux-image-6.12.118+deb13-amd64',
        'trixie-security',
        layers=('podman',),
        runs=('container_runtime', 'minimal_init'),
        notes="Debian 13's kernel; podman + crun for real containers, and the minimal inits",
    ),
    Row(
        '6.1-arm64',
        'arm64',
        'linux-image-6.1.0-56-arm64',
        'bookworm-security',
        runs=('slow',),
        timeout=1800,
        notes="Debian 12's kernel on arm64 (qemu virt, cortex-a57), with the arm64 wheel; the long tests",
    ),
    Row(
        '6.12-arm64-16k',
        'arm64',
        'linux-image-6.12.118+deb13-arm64-16k',
        'trixie-security',
        # What depends on the page size: the OOM kills' kB figures against the kernel's report.
        files=(
            'tests/test_kernel.py',
            'tests/test_oom_kill_probe.py',
            'tests/test_oom_kill_context.py',
            'tests/test_check.py',
            'tests/test_memory_killers.py',
            'tests/test_ring_buffers.py',  # positions a page apart
        ),
        qemu_cpu='max,pauth=off',  # cortex-a57 has no 16 kB granule; pointer authentication costs 2x
        timeout=1800,
        notes="Debian 13's 16 kB page kernel on arm64: every size in kB as the kernel prints it",
    ),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}

# Where the suites are: the machine's own Debian archive and security archive (found in its apt
# sources, tests/vm/build.py), under a private apt configuration that leaves the machine's alone.
SUITES = {
    'bullseye': 'debian',
    'bookworm': 'debian',
    'bookworm-security': 'debian-security',
    'trixie': 'debian',
    'trixie-security': 'debian-security',
}

# The guest's userland: Debian 12 (Python 3.11, as the host's venv), one root per architecture.
ROOT_SUITE = 'bookworm'
ROOT_SUITES = ('bookworm', 'bookworm-security')
ROOT_PACKAGES = (
    'python3',
    'libbpf1',  # until the wheel bundles its own libbpf
    'bpftool',  # the tests compare with `bpftool -j`
    'iproute2',  # network namespaces and veth pairs (attachments to interfaces)
    'mount',
    'util-linux',
    'procps',
    'busybox',
    'strace',
)
# The tests' Python dependencies, as binary wheels for the guest's architecture and Python.
GUEST_PIP_PACKAGES = ('datadog-checks-base[deps]', 'datadog-checks-dev', 'pytest', 'hypothesis', 'markdown-it-py')


@dataclass(frozen=True)
class Layer:
    """Debian packages installed over the root; only what they add or change is packed."""

    packages: tuple[str, ...]
    notes: str = ''


LAYERS = {
    'bcc': Layer(('python3-bpfcc',), notes="BCC 0.26 for Debian 12's Python"),
    'earlyoom': Layer(('earlyoom',), notes='a user-space memory killer, run by the tests that need one'),
    'podman': Layer(
        ('podman', 'crun', 'conmon', 'catatonit', 'tini', 'dumb-init'),
        notes='podman 4.3 + crun, cgroupfs manager, vfs storage on tmpfs; catatonit for `podman run --init`, '
        'and the other minimal inits',
    ),
    # 'headers' is made per row from the row's kernel (Row.headers), see tests/vm/build.py.
}


def select(names: str | None) -> list[Row]:
    """Rows named in a space- or comma-separated list (all when empty); an unknown name is an error."""
    wanted = (names or '').replace(',', ' ').split()
    if not wanted:
        return list(ROWS)
    unknown = [name for name in wanted if name not in ROWS_BY_NAME]
    if unknown:
        raise SystemExit(f'unknown kernel row(s) {unknown}; the rows are {list(ROWS_BY_NAME)}')
    return [ROWS_BY_NAME[name] for name in wanted]
