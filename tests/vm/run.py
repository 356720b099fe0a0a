# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Boot a VM row and bring its results back (the host side of tests/vm/guest.py).

The initramfs of a run is the root of the row's architecture, the row's layers, and an overlay made
here: /init, guest.py, the row's run.json (its pytest arguments), the kernel's config, this
checkout's tests/ and pyproject.toml, and the wheel built from the checkout installed into the
guest's venv. `python -m tests.vm.run [ROW ...]` runs rows without pytest and prints the table.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from . import build, initramfs, kernels

REPO = build.REPO
HERE = Path(__file__).resolve().parent
RESULTS = build.CACHE / 'results'
# Folders of the checkout copied into the guest beside its top-level files (not datadog_checks/).
CHECKOUT_FOLDERS = ('tests', 'assets')
BEGIN = '=== ebpf-probe results begin sha256='
END = '=== ebpf-probe results end ==='


def selection(row: kernels.Row) -> list[str]:
    """The row's pytest arguments: VM_PYTEST (shell words) for every row, else the smoke selection and
    the row's own additions."""
    override = os.environ.get('VM_PYTEST', '').strip()
    if override:
        return shlex.split(override)
    return ['-m', row.marker_expression, *row.files, *row.tests]


# --- The wheel ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # distribution name, as in its .dist-info folder
    sha256: str

    @property
    def platform(self) -> str:
        return self.path.stem.rsplit('-', 1)[1]


# Another architecture's bundled libbpf and CO-RE objects, as `make bundle-other-arch` builds them.
OTHER_ARCH_BUILDS = {
    'aarch64': (REPO / '.cache' / 'bundle' / 'aarch64' / 'libbpf.so.1', REPO / 'build' / 'bpf' / 'arm64'),
    'x86_64': (REPO / '.cache' / 'bundle' / 'x86_64' / 'libbpf.so.1', REPO / 'build' / 'bpf' / 'x86'),
}


def build_wheel(out: Path, machine: str | None = None) -> Wheel:
    """The wheel of this checkout, as `python -m build --wheel` makes it (the BPF objects must be built);
    for another machine, with that machine's library and objects (the wheel is a platform wheel)."""
    env = dict(os.environ)
    if machine is not None and machine != os.uname().machine:
        library, objects = OTHER_ARCH_BUILDS[machine]
        if not library.is_file() or not objects.is_dir():
            raise build.BuildError(f'no {machine} build of the library and objects: `make bundle-other-arch` makes it')
        env.update(EBPF_PROBE_LIBBPF=str(library), EBPF_PROBE_BPF_DIR=str(objects))
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, '-m', 'build', '--wheel', '--outdir', str(out), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode:
        raise build.BuildError('python -m build --wheel failed:\n' + (result.stdout + result.stderr)[-3000:])
    [path] = out.glob('*.whl')
    return Wheel(path, path.name.split('-')[0], hashlib.sha256(path.read_bytes()).hexdigest())


def wheel_for(arch: kernels.Arch, wheel: Wheel) -> Wheel:
    """The host's wheel if it runs on arch, else the same checkout's wheel built for arch."""
    if wheel.platform == 'any' or wheel.platform.endswith(arch.machine):
        return wheel
    return build_wheel(wheel.path.parent.parent / arch.machine, arch.machine)


def install_wheel(cpio: initramfs.Cpio, wheel: Wheel, site_packages: str) -> str:
    """The wheel's files into the guest's venv, with its console scripts: what pip would install."""
    with zipfile.ZipFile(wheel.path) as archive:
        names = archive.namelist()
        [dist_info] = {n.split('/')[0] for n in names if n.split('/')[0].endswith('.dist-info')}
        for name in names:
            if not name.endswith('/'):
                cpio.file(f'{site_packages}/{name}', archive.read(name))
        entry_points = (
            archive.read(f'{dist_info}/entry_points.txt').decode() if f'{dist_info}/entry_points.txt' in names else ''
        )
    section = None
    for line in entry_points.splitlines():
        line = line.strip()
        if line.startswith('['):
            section = line.strip('[]')
        elif '=' in line and section == 'console_scripts':
            script, target = (part.strip() for part in line.split('=', 1))
            module, function = target.split(':')
            cpio.file(
                f'opt/venv/bin/{script}',
                f'#!/opt/venv/bin/python\nimport sys\nfrom {module} import {function}\n'
                f'sys.exit({function}())\n'.encode(),
                mode=0o755,
            )
    return dist_info


# --- One run -----------------------------------------------------------------------------------


def overlay(row: kernels.Row, caches: dict, wheel: Wheel, path: Path) -> None:
    info = caches['root_info']
    run = {
        'row': row.name,
        'release': row.release,
        'pytest_args': selection(row),
        'layers': list(row.layers),
        'wheel': {'site_packages': info['site_packages'], 'sha256': wheel.sha256},
    }
    with open(path, 'wb') as out:
        cpio = initramfs.Cpio(out, mtime=int(time.time()))
        cpio.directory('dev')
        cpio.char_device('dev/console', 5, 1)
        cpio.file('init', (HERE / 'init').read_bytes(), mode=0o755)
        cpio.file('opt/ebpf-probe/guest.py', (HERE / 'guest.py').read_bytes())
        cpio.file('opt/ebpf-probe/kernel-config', (caches['kernel'] / 'config').read_bytes())
        # The checkout as the tests read it (pyproject.toml, metadata.csv, manifest.json, assets/...),
        # without the package itself: that comes from the wheel.
        for path in sorted(REPO.iterdir()):
            if path.is_file() and not path.name.startswith('.'):
                cpio.file(f'opt/ebpf-probe/checkout/{path.name}', path.read_bytes())
        for folder in CHECKOUT_FOLDERS:
            cpio.tree(
                REPO / folder,
                f'opt/ebpf-probe/checkout/{folder}',
                skip=lambda p: '__pycache__' in p.parts or p.suffix == '.pyc',
            )
        dist_info = install_wheel(cpio, wheel, info['site_packages'].lstrip('/'))
        run['wheel']['dist_info'] = dist_info
        cpio.file('opt/ebpf-probe/run.json', json.dumps(run, indent=1).encode())
        cpio.close()


def accelerator(arch: kernels.Arch) -> list[str]:
    host = os.uname().machine
    cpuinfo = Path('/proc/cpuinfo').read_text() if host == 'x86_64' else ''
    kvm = arch.machine == host and os.access('/dev/kvm', os.R_OK | os.W_OK) and (' vmx' in cpuinfo or ' svm' in cpuinfo)
    # One TCG thread for all vCPUs: with a thread each, a vCPU can run kernel code another vCPU
    # has just patched, as it was (seen on 6.12: an `Oops: int3` in bpf_iter_run_prog while the
    # statistics' static key flipped). Costs ~12% on the 6.12 row (153 s -> 172 s).
    return ['-accel', 'kvm'] if kvm else ['-accel', 'tcg,thread=single']


def qemu_command(row: kernels.Row, caches: dict, initrd: Path) -> list[str]:
    arch = kernels.ARCHES[row.arch]
    accel = accelerator(arch)
    machine = list(arch.qemu_args)
    cpu = machine.index('-cpu') + 1
    machine[cpu] = 'host' if accel[1] == 'kvm' else row.qemu_cpu or machine[cpu]
    return [
        arch.qemu,
        *accel,
        *machine,
        '-m',
        '3072',
        '-smp',
        '2',
        '-nographic',
        '-no-reboot',
        '-nic',
        'none',
        '-kernel',
        str(caches['kernel'] / 'vmlinuz'),
        '-initrd',
        str(initrd),
        '-append',
        f'console={arch.console} panic=-1 quiet loglevel=3 rdinit=/init',
    ]


@dataclass
class RowResult:
    row: kernels.Row
    problem: str | None = None  # why the row could not run or report (the row then fails)
    release: str | None = None
    prepare_seconds: float = 0.0  # caches (cold: built), wheel, overlay
    run_seconds: float = 0.0  # qemu: boot, facts, pytest, power off
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    pytest_exit: int | None = None
    failures: list[str] = field(default_factory=list)
    expected_failed: list[str] = field(default_factory=list)  # the row's expected failures that failed
    unexpected_passes: list[str] = field(default_factory=list)  # ... that passed: the table must say so
    facts: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    folder: Path | None = None

    @property
    def ok(self) -> bool:
        return (
            self.problem is None
            and self.release == self.row.release
            and self.failed == self.errors == self.skipped == 0
            and not self.unexpected_passes
            and self.passed > 0
            and self.pytest_exit == (1 if self.expected_failed else 0)
        )

    def line(self) -> str:
        status = 'ok' if self.ok else 'FAILED'
        counts = f'{self.passed} passed, {self.failed} failed, {self.errors} errors, {self.skipped} skipped'
        if self.expected_failed:
            counts += f', {len(self.expected_failed)} expected failures'
        if self.unexpected_passes:
            counts += f', {len(self.unexpected_passes)} expected failures PASSED'
        return (
            f'{self.row.name:<10} {status:<6} {self.release or "-":<26} {self.run_seconds:5.0f} s boot+run '
            f'(+{self.prepare_seconds:.0f} s prepare)  {counts}' + (f'  [{self.problem}]' if self.problem else '')
        )

    def expected_lines(self) -> list[str]:
        reasons = dict(self.row.expected_failures)
        return [f'{self.row.name:<10} expected failure: {node} ({reasons[node]})' for node in self.expected_failed]

    def facts_line(self) -> str:
        f = self.facts
        if not f or 'error' in f:
            return f'{self.row.name:<10} facts: {f.get("error", "none") if f else "none"}'
        btf = f.get('btf_names') or {}
        functions = btf.get('functions', {})
        return (
            f'{self.row.name:<10} facts: BTF {yes(f["btf"])}, kprobe PMU {yes(f["kprobe_pmu"])}, '
            f'FPROBE {f["config"].get("FPROBE")}, mark_victim fields {f["mark_victim_fields"]}, '
            f'bpf_map_sum_elem_count {yes(functions.get("bpf_map_sum_elem_count"))}, '
            f'ringbuf {yes(f.get("bpftool", {}).get("ringbuf_map"))}, '
            f'memory.oom.group {yes(f["cgroup"].get("memory_oom_group"))}'
        )


def yes(value) -> str:
    return 'yes' if value else 'no'


def read_results(console: str, folder: Path) -> None:
    """The guest's /results, out of the console output, into folder."""
    if BEGIN not in console:
        raise build.BuildError('the guest printed no results')
    head, rest = console.split(BEGIN, 1)
    digest, rest = rest.split(' ===', 1)
    if END not in rest:
        raise build.BuildError('the results on the console are cut short')
    payload = base64.b64decode(''.join(rest.split(END, 1)[0].split()))
    if hashlib.sha256(payload).hexdigest() != digest.strip():
        raise build.BuildError('the results on the console are damaged (sha256 differs)')
    with tarfile.open(fileobj=io.BytesIO(payload), mode='r:gz') as tar:
        for member in tar.getmembers():  # plain files and folders only, inside folder
            if member.isfile() and '..' not in Path(member.name).parts:
                (folder / member.name).parent.mkdir(parents=True, exist_ok=True)
                (folder / member.name).write_bytes(tar.extractfile(member).read())


def nodeid(case: ET.Element) -> str:
    """pytest's node id of a junit testcase (xunit1: it names the file)."""
    file, classname, name = case.get('file', ''), case.get('classname', ''), case.get('name', '')
    module = file.removesuffix('.py').replace('/', '.')
    cls = classname[len(module) + 1 :] if file and classname.startswith(module + '.') else ''
    return f'{file}::{cls + "::" if cls else ""}{name}' if file else f'{classname}::{name}'


def parse_junit(result: RowResult, path: Path) -> None:
    """Counts and failures; the row's expected failures are told apart (and must still fail)."""
    expected = dict(result.row.expected_failures)
    seen = set()
    for case in ET.parse(path).getroot().iter('testcase'):
        node = nodeid(case)
        outcome = next((child for child in case if child.tag in ('failure', 'error', 'skipped')), None)
        if outcome is None:
            result.passed += 1
            if node in expected:
                result.unexpected_passes.append(node)
        elif outcome.tag == 'skipped':
            # Nothing else runs in a VM: a test that skips there skipped what it was there to test.
            result.skipped += 1
            text = (outcome.get('message') or outcome.text or '').strip()
            result.failures.append(f'--- skipped (a failure in a VM row): {node}\n{text[-2000:]}')
        elif outcome.tag == 'failure' and node in expected:
            result.expected_failed.append(node)
            seen.add(node)
        else:
            if outcome.tag == 'failure':
                result.failed += 1
            else:
                result.errors += 1
            text = (outcome.text or outcome.get('message') or '').strip()
            result.failures.append(f'--- {outcome.tag}: {node}\n{text[-6000:]}')


def run_row(row: kernels.Row, wheel: Wheel, echo=lambda line: None) -> RowResult:
    """Prepare, boot and read back one row. Never raises for the row's own trouble: result.problem."""
    result = RowResult(row)
    folder = RESULTS / row.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    result.folder = folder
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f'vm-{row.name}-'))
    try:
        try:
            arch = kernels.ARCHES[row.arch]
            if not shutil.which(arch.qemu):
                raise build.BuildError(f'{arch.qemu} is not installed (Debian package {arch.debian_package})')
            caches = build.row_caches(row)
            row_wheel = wheel_for(arch, wheel)
            initrd = work / 'initrd.cpio'
            overlay(row, caches, row_wheel, work / 'overlay.cpio')
            with open(initrd, 'wb') as out:  # concatenated archives: a later one's files win
                for part in (caches['root'], *caches['layers'], work / 'overlay.cpio'):
                    with open(part, 'rb') as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        except build.BuildError as error:
            result.problem = f'cannot prepare the row: {error}'
            return result
        finally:
            result.prepare_seconds = time.monotonic() - started
        command = qemu_command(row, caches, initrd)
        (folder / 'qemu-command').write_text(shlex.join(command) + '\n')
        timeout = int(os.environ.get('VM_TIMEOUT') or row.timeout)
        console, result.run_seconds, timed_out = boot(command, timeout, folder / 'console.log', echo)
        if timed_out:
            result.problem = f'no result within {timeout} s (console: {folder / "console.log"})'
            return result
        try:
            read_results(console, folder)
        except build.BuildError as error:
            tail = '\n'.join(console.splitlines()[-60:])
            result.problem = f'{error}; the console ended with:\n{tail}'
            return result
        result.summary = json.loads((folder / 'summary.json').read_text())
        result.pytest_exit = result.summary.get('pytest_exit')
        result.facts = json.loads((folder / 'facts.json').read_text())
        result.release = result.facts.get('release')
        if (folder / 'junit.xml').exists():
            parse_junit(result, folder / 'junit.xml')
        else:
            result.problem = f'pytest wrote no junit.xml (exit {result.pytest_exit}); see {folder / "pytest.log"}'
        if result.release != row.release:
            result.problem = f'booted {result.release}, not {row.release}'
        elif result.pytest_exit not in (0, 1) and result.problem is None:
            result.problem = f'pytest exit status {result.pytest_exit}; see {folder / "pytest.log"}'
        wheel_facts = result.facts.get('wheel', {})
        if wheel_facts.get('record_mismatches'):
            result.problem = f'installed wheel differs from its RECORD: {wheel_facts["record_mismatches"]}'
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def boot(command: list[str], timeout: int, log: Path, echo) -> tuple[str, float, bool]:
    """Run qemu to the guest's power-off; the console is kept in log, the guest's lines echoed."""
    started = time.monotonic()
    lines: list[str] = []
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors='replace',
        )

        def pump():
            for line in proc.stdout:
                line = line.replace('\r', '')
                lines.append(line)
                out.write(line)
                if line.startswith(('guest: ', 'init: ')):
                    echo(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(30)
    return ''.join(lines), time.monotonic() - started, timed_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('rows', nargs='*')
    args = parser.parse_args()
    rows = kernels.select(' '.join(args.rows) or os.environ.get('KERNELS'))
    with tempfile.TemporaryDirectory() as out:
        wheel = build_wheel(Path(out))
        results = [run_row(row, wheel, echo=print) for row in rows]
    for result in results:
        print(result.line())
        print(result.facts_line())
        for line in result.expected_lines():
            print(line)
        for failure in result.failures:
            print(failure)
    return 0 if all(r.ok for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
