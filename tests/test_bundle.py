# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The wheel carries its own libbpf: a platform wheel that runs where the host has no libbpf.so.1.

The Agent's image (Ubuntu 24.04) has no libbpf.so.1, Ubuntu 22.04 hosts only libbpf0 and RHEL 8 an
older libbpf: the bundled library (make bundle) must need nothing from the host but glibc 2.28.
The other architecture's build (arm64 here, `make bundle-other-arch`) is checked as far as this
machine can: its floor, exports and wheel, and a smoke test under qemu-user.
"""

import email.parser
import os
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

from datadog_checks.ebpf_probe.kernel import libbpf

from .bpf_syscalls import libbpf_version

pytestmark = pytest.mark.build  # gcc, objdump, qemu-user, python -m build, auditwheel: this machine's toolchain

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = '/usr/bin/python3'
BUNDLED = REPO / 'datadog_checks' / 'ebpf_probe' / 'data' / 'lib' / 'libbpf.so.1'
PACKAGED = 'datadog_checks/ebpf_probe/data/lib/libbpf.so.1'
ARCH = platform.machine()
OTHER_ARCH = 'aarch64' if ARCH == 'x86_64' else 'x86_64'
TAG = f'py3-none-manylinux_2_28_{ARCH}'
GLIBC_FLOOR = (2, 28)  # RHEL 8, Debian 10
# What libelf and zlib would export if they were not hidden.
FOREIGN_SYMBOL = re.compile(
    r'^(elf|elf32|elf64|gelf|eu|__libelf|inflate|deflate|gz|crc32|adler32|zlib|compress|uncompress|z_)'
)


@pytest.fixture(scope='module')
def bundled() -> Path:
    assert BUNDLED.is_file(), f'{BUNDLED} is missing: `make bundle` builds it'
    return BUNDLED


def other_arch_build() -> tuple[Path, Path]:
    """The other architecture's library and CO-RE objects (make bundle-other-arch)."""
    library = REPO / '.cache' / 'bundle' / OTHER_ARCH / 'libbpf.so.1'
    assert library.is_file(), f'no {OTHER_ARCH} build: `make bundle-other-arch` (part of make test) cross-builds it'
    return library, REPO / 'build' / 'bpf' / {'aarch64': 'arm64', 'x86_64': 'x86'}[OTHER_ARCH]


@pytest.fixture(scope='module', params=[ARCH, OTHER_ARCH])
def library(request, bundled) -> Path:
    return bundled if request.param == ARCH else other_arch_build()[0]


@pytest.fixture(scope='module')
def wheel(bundled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('dist')
    subprocess.run(
        [sys.executable, '-m', 'build', '--wheel', '--outdir', str(out), str(REPO)], check=True, capture_output=True
    )
    [path] = out.glob('datadog_ebpf_probe-*.whl')
    return path


def dynamic_symbols(path: Path) -> list[tuple[bool, str, str]]:
    """(defined, version, name) of each dynamic symbol, as `objdump -T` lists them."""
    output = subprocess.run(['objdump', '-T', str(path)], capture_output=True, text=True, check=True).stdout
    symbols = []
    for line in output.splitlines():
        match = re.match(r'^[0-9a-f]+ .{7} (\S+)\s+[0-9a-f]+\s+(?:\((\S+)\)|(\S+))\s+(\S+)$', line)
        if match:
            section, hidden_version, version, name = match.groups()
            symbols.append((section != '*UND*', hidden_version or version, name))
    return symbols


def glibc_versions(path: Path) -> set[tuple[int, ...]]:
    return {
        tuple(int(n) for n in version.split('_', 1)[1].split('.'))
        for defined, version, _ in dynamic_symbols(path)
        if not defined and version.startswith('GLIBC_')
    }


# --- The library -------------------------------------------------------------------------------


def test_the_bundled_libbpf_needs_glibc_2_28_at_most(library):
    versions = glibc_versions(library)
    assert versions, 'objdump -T found no GLIBC_ symbol versions'
    floor = max(versions)
    print(f'glibc floor of {library}: {".".join(map(str, floor))}')
    assert floor <= GLIBC_FLOOR, {
        name: version
        for defined, version, name in dynamic_symbols(library)
        if not defined and version.startswith('GLIBC_') and tuple(map(int, version[6:].split('.'))) > GLIBC_FLOOR
    }


def test_the_bundled_libbpf_needs_only_glibc(library):
    dynamic = subprocess.run(['readelf', '-d', str(library)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r'\(NEEDED\)\s+Shared library: \[(\S+)\]', dynamic))
    assert needed <= {'libc.so.6', 'ld-linux-x86-64.so.2', 'ld-linux-aarch64.so.1'}, needed
    assert 'Library soname: [libbpf.so.1]' in dynamic


def test_the_bundled_libbpf_exports_only_libbpf(library):
    exported = [(version, name) for defined, version, name in dynamic_symbols(library) if defined]
    assert len(exported) > 300
    assert [name for _, name in exported if FOREIGN_SYMBOL.match(name)] == []
    assert [name for version, name in exported if not version.startswith('LIBBPF_')] == []
    # Everything the ctypes layer declares is there: the bundled version is the one it is written for.
    names = {name for _, name in exported}
    assert set(libbpf._SIGNATURES) - names == set()


def test_the_bundled_libbpf_parses_btf_and_opens_an_object_natively_or_under_qemu_user(library, tmp_path):
    elf_arch = {b'\x3e\x00': 'x86_64', b'\xb7\x00': 'aarch64'}[library.read_bytes()[18:20]]
    compiler, run = ['gcc'], []
    if elf_arch != ARCH:
        compiler, run = [f'{elf_arch}-linux-gnu-gcc'], [f'qemu-{elf_arch}', '-L', f'/usr/{elf_arch}-linux-gnu']
    smoke = tmp_path / 'smoke'
    subprocess.run(
        [*compiler, '-O2', '-Wall', '-Werror', '-o', str(smoke), str(REPO / 'bundle' / 'smoke.c')], check=True
    )
    objects = BUNDLED.parent.parent / 'bpf' if elf_arch == ARCH else other_arch_build()[1]
    result = subprocess.run(
        [*run, str(smoke), str(library), str(objects / 'oom_kill.bpf.o'), '/sys/kernel/btf/vmlinux'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r'libbpf 1\.5: \d{4,} BTF types, \d+ in the object\n', result.stdout), result.stdout


def test_the_check_loads_the_bundled_libbpf_from_the_source_tree(bundled):
    assert libbpf.library_candidates() == [str(bundled), 'libbpf.so.1']
    assert libbpf_version() == '1.5'
    with open('/proc/self/maps') as f:
        mapped = {line.split()[-1] for line in f if 'libbpf.so' in line}
    assert str(bundled) in mapped


@pytest.mark.unit
def test_without_a_bundled_libbpf_the_hosts_is_loaded(monkeypatch, tmp_path):
    monkeypatch.setattr(libbpf, 'BUNDLED_LIBBPF', tmp_path / 'libbpf.so.1')
    assert libbpf.library_candidates() == ['libbpf.so.1']


@pytest.mark.unit
def test_a_bundled_libbpf_that_cannot_load_falls_back_to_the_hosts(tmp_path, caplog):
    broken = tmp_path / 'libbpf.so.1'
    broken.write_bytes(b'')
    lib = libbpf._load_first([str(broken), 'libbpf.so.1'])
    assert lib.libbpf_major_version() == 1
    assert f'the bundled libbpf does not load, the host libbpf.so.1 is used instead: {broken}' in caplog.text


@pytest.mark.unit
def test_when_no_libbpf_loads_the_error_names_each_one_tried(tmp_path):
    broken = tmp_path / 'libbpf.so.1'
    broken.write_bytes(b'')
    with pytest.raises(libbpf.LibbpfUnavailable) as error:
        libbpf._load_first([str(broken), 'libbpf-absent.so.1'])
    assert str(broken) in str(error.value) and 'libbpf-absent.so.1' in str(error.value)
    assert 'libbpf1' in str(error.value)


# --- The wheel ---------------------------------------------------------------------------------


def test_the_wheel_is_a_manylinux_2_28_platform_wheel(wheel):
    assert wheel.name.endswith(f'-{TAG}.whl'), wheel.name
    name, _version, _build, tags = parse_wheel_filename(wheel.name)
    assert name == 'datadog-ebpf-probe'
    assert set(tags) & set(sys_tags()), 'pip on this machine would refuse the wheel'
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith('.dist-info/WHEEL'))).decode()
    assert 'Root-Is-Purelib: false' in metadata
    assert f'Tag: {TAG}' in metadata
    assert archive.read(PACKAGED) == BUNDLED.read_bytes()
    assert archive.getinfo(PACKAGED).external_attr >> 16 & 0o111, 'the library is not executable'


def test_auditwheel_finds_the_wheel_consistent_with_manylinux_2_28(wheel):
    result = subprocess.run(
        [str(Path(sys.executable).parent / 'auditwheel'), 'show', str(wheel)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    report = ' '.join(result.stdout.split())
    print(report)
    assert f'is consistent with the following platform tag: "manylinux_2_28_{ARCH}"' in report
    assert f'constrains the platform tag to "manylinux_2_28_{ARCH}"' in report


def test_the_other_architectures_wheel_carries_its_library_and_objects(tmp_path):
    library, objects = other_arch_build()
    env = {**os.environ, 'EBPF_PROBE_LIBBPF': str(library), 'EBPF_PROBE_BPF_DIR': str(objects)}
    subprocess.run(
        [sys.executable, '-m', 'build', '--wheel', '--outdir', str(tmp_path), str(REPO)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    [wheel] = tmp_path.glob('*.whl')
    assert wheel.name.endswith(f'-py3-none-manylinux_2_28_{OTHER_ARCH}.whl'), wheel.name
    archive = zipfile.ZipFile(wheel)
    assert archive.read(PACKAGED) == library.read_bytes()
    # Its kprobe reads its own architecture's registers: the objects differ from this machine's.
    packaged_object = archive.read('datadog_checks/ebpf_probe/data/bpf/oom_kill.bpf.o')
    assert packaged_object == (objects / 'oom_kill.bpf.o').read_bytes()
    assert packaged_object != (BUNDLED.parent.parent / 'bpf' / 'oom_kill.bpf.o').read_bytes()
    report = subprocess.run(
        [str(Path(sys.executable).parent / 'auditwheel'), 'show', str(wheel)], capture_output=True, text=True
    )
    assert f'consistent with the following platform tag: "manylinux_2_28_{OTHER_ARCH}"' in ' '.join(
        report.stdout.split()
    ), report.stdout + report.stderr


def test_the_agents_local_wheel_install_accepts_it(wheel):
    """What `datadog-agent integration install -w` reads (cmd/agent/subcommands/integrations/command.go)."""
    archive = zipfile.ZipFile(wheel)
    metadata = email.parser.Parser().parsestr(
        archive.read(next(n for n in archive.namelist() if n.endswith('.dist-info/METADATA'))).decode()
    )
    # validateBaseDependency: a check depends on datadog-checks-base.
    assert any(r.startswith('datadog-checks-base') for r in metadata.get_all('Requires-Dist'))
    # parseWheelPackageName, then getIntegrationName: datadog-ebpf-probe -> ebpf_probe, whose data/
    # folder's conf.yaml.example is copied to conf.d/ebpf_probe.d/.
    assert metadata['Name'] == 'datadog-ebpf-probe'
    assert 'datadog_checks/ebpf_probe/data/conf.yaml.example' in archive.namelist()


# --- Installed where the host has no libbpf ----------------------------------------------------


@pytest.fixture(scope='module')
def clean_venv(wheel, tmp_path_factory) -> Path:
    """A venv that sees no system packages, the wheel installed as the Agent installs it."""
    venv = tmp_path_factory.mktemp('no-system') / 'venv'
    subprocess.run([SYSTEM_PYTHON, '-m', 'venv', str(venv)], check=True)
    pip = [str(venv / 'bin' / 'pip'), 'install', '-q', '--disable-pip-version-check']
    # `datadog-agent integration install -w`: pip install --no-index --no-deps (command.go, install()).
    subprocess.run([*pip, '--no-cache-dir', '--no-index', '--no-deps', str(wheel)], check=True, capture_output=True)
    subprocess.run([*pip, 'datadog-checks-base[deps]'], check=True, capture_output=True)  # the Agent has it
    return venv


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ('LD_LIBRARY_PATH', 'LD_PRELOAD', 'PYTHONPATH')}


def without_hosts_libbpf(args: list[str]) -> list[str]:
    """Run args in a mount namespace where the host's libbpf.so.1 is an empty file."""
    target = os.path.realpath(f'/usr/lib/{ARCH}-linux-gnu/libbpf.so.1')
    assert os.path.isfile(target), 'the host has no libbpf.so.1 to hide (Debian: libbpf1)'
    return ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
            'mount --bind /dev/null "$0" && exec "$@"', target, *args]  # fmt: skip


LOAD_AND_SHOW_MAPS = """
import logging
from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe
probe = load_oom_kill_probe(OOMKillProbeOptions(allow_runtime_compiled_fallback=False), logging.getLogger('t'))
print(probe.variant)
with open('/proc/self/maps') as f:
    print('\\n'.join(sorted({line.split()[-1] for line in f if 'libbpf' in line or 'libelf' in line})))
probe.close()
"""


@pytest.mark.kernel
@pytest.mark.slow
@pytest.mark.parametrize('host_libbpf', ['present', 'hidden'])
def test_the_installed_wheel_loads_the_co_re_probe_with_its_own_libbpf(clean_venv, tmp_path, root, host_libbpf):
    wrap = without_hosts_libbpf if host_libbpf == 'hidden' else list
    packaged = subprocess.run(
        [str(clean_venv / 'bin' / 'python'), '-c', 'from datadog_checks.ebpf_probe.kernel import libbpf; '
         'print(libbpf.BUNDLED_LIBBPF)'],
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(), check=True,
    ).stdout.strip()  # fmt: skip
    assert packaged.startswith(str(clean_venv)), packaged
    if host_libbpf == 'hidden':
        hidden = subprocess.run(
            wrap([str(clean_venv / 'bin' / 'python'), '-c', 'import ctypes; ctypes.CDLL("libbpf.so.1")']),
            capture_output=True, text=True, env=clean_env(),
        )  # fmt: skip
        assert hidden.returncode != 0 and 'libbpf.so.1' in hidden.stderr, 'the host libbpf is still loadable'

    # The probe, and what the process has mapped: the bundled copy, no other libbpf, no libelf.
    probe = subprocess.run(
        wrap([str(clean_venv / 'bin' / 'python'), '-c', LOAD_AND_SHOW_MAPS]),
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    variant, *mapped = probe.stdout.split()
    assert variant == 'co-re'
    assert mapped == [packaged]

    # The whole check, as the Agent runs it.
    result = subprocess.run(
        wrap([str(clean_venv / 'bin' / 'ebpf-probe'), 'check', '--json', '-l', 'info']),
        capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'libbpf 1.5 loaded from {packaged}' in result.stderr
    assert 'Loaded the oom_kill probe (co-re)' in result.stderr
    assert 'Loaded the ebpf_stats probe (co-re)' in result.stderr
