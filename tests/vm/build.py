# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the VM rows boot, built once and cached under .cache/vm (as root; nothing installed on the host):

    apt/                  a private apt configuration (the suites of tests/vm/kernels.py), its lists
    kernels/<package>/    vmlinuz and config, taken out of the kernel package
    root-<arch>/          the Debian 12 root of an architecture (mmdebstrap; a foreign one runs its
                          maintainer scripts under qemu-user through binfmt_misc), with a venv holding
                          the tests' Python dependencies (binary wheels for that architecture)
    root-<arch>.cpio      that root, packed as an initramfs archive (the kernel unpacks it into RAM)
    layers/<arch>/*.cpio  what a layer adds over the root (kernel headers, BCC, podman)

Each cached thing is rebuilt when its recipe (the table's entries it depends on) changes.
`python -m tests.vm.build [ROW ...]` builds what the rows need; `--candidates ROW` lists the kernel
packages of the row's series that the archive has now (to move a pin).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from . import initramfs, kernels

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / '.cache' / 'vm'
RECIPE_VERSION = 1  # bump to rebuild every cache
# Never packed into the guest: apt's state, caches, logs (a layer's would also undo another layer's).
NOT_PACKED = (
    'var/lib/apt/lists',
    'var/cache',
    'var/log',
    'var/lib/dpkg',
    'etc/ld.so.cache',
    'usr/share/doc',
    'usr/share/man',
    'usr/share/info',
    'usr/share/locale',
)
LISTS_MAX_AGE = 6 * 3600


class BuildError(Exception):
    """A cache could not be built: the reason, for the row that needed it."""


def say(message: str) -> None:
    print(f'vm-build: {message}', file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise BuildError(f'{what} failed (exit {result.returncode}): {" ".join(cmd)}\n' + '\n'.join(output[-40:]))
    return result


@contextlib.contextmanager
def timed(what: str):
    started = time.monotonic()
    say(f'{what}...')
    yield
    say(f'{what}: {time.monotonic() - started:.0f} s')


def recipe_matches(path: Path, recipe: dict) -> bool:
    stamp = path.with_name(path.name + '.recipe')
    return path.exists() and stamp.exists() and stamp.read_text() == json.dumps(recipe, sort_keys=True)


def write_recipe(path: Path, recipe: dict) -> None:
    path.with_name(path.name + '.recipe').write_text(json.dumps(recipe, sort_keys=True))


@contextlib.contextmanager
def cache_lock():
    """One build at a time per checkout."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- The machine's Debian archives -------------------------------------------------------------


def _source_entries():
    """(uri, suites) of every entry of the machine's apt sources, one-line and deb822 formats."""
    files = [Path('/etc/apt/sources.list'), *sorted(Path('/etc/apt/sources.list.d').glob('*'))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == '.sources':
            for stanza in re.split(r'\n\s*\n', text):
                fields = {}
                for line in stanza.splitlines():
                    if ':' in line and not line.startswith(('#', ' ')):
                        key, value = line.split(':', 1)
                        fields[key.strip().lower()] = value.strip()
                if 'deb' in fields.get('types', '').split() and fields.get('enabled', 'yes') != 'no':
                    for uri in fields.get('uris', '').split():
                        yield uri, fields.get('suites', '').split()
        elif path.suffix == '.list' or path == files[0]:
            for line in text.splitlines():
                line = re.sub(r'\[[^]]*\]', '', line.split('#', 1)[0]).split()
                if len(line) >= 3 and line[0] == 'deb':
                    yield line[1], [line[2]]


def archives() -> dict[str, str]:
    """The Debian archive and the security archive this machine uses (VM_DEBIAN_ARCHIVE and
    VM_DEBIAN_SECURITY_ARCHIVE override them)."""
    found = {
        'debian': os.environ.get('VM_DEBIAN_ARCHIVE'),
        'debian-security': os.environ.get('VM_DEBIAN_SECURITY_ARCHIVE'),
    }
    for uri, suites in _source_entries():
        for suite in suites:
            kind = kernels.SUITES.get(suite)
            if kind and not found[kind]:
                found[kind] = uri.rstrip('/')
    missing = [kind for kind, uri in found.items() if not uri]
    if missing:
        raise BuildError(
            f'no {missing} archive in the apt sources of this machine: set VM_DEBIAN_ARCHIVE / '
            'VM_DEBIAN_SECURITY_ARCHIVE'
        )
    return found


# --- A private apt configuration ---------------------------------------------------------------


class Apt:
    """apt-get and apt-cache over the suites of the table, leaving the machine's sources alone."""

    def __init__(self):
        self.dir = CACHE / 'apt'
        self.updated = False

    def options(self) -> list[str]:
        return [
            '-o',
            f'Dir::Etc::SourceList={self.dir / "sources.list"}',
            '-o',
            'Dir::Etc::SourceParts=/dev/null',
            '-o',
            f'Dir::State::Lists={self.dir / "lists"}',
            '-o',
            f'Dir::Cache={self.dir / "cache"}',
            '-o',
            'Dir::State::Status=/dev/null',  # nothing is installed here: downloads only
            '-o',
            'APT::Architectures::=amd64',
            '-o',
            'APT::Architectures::=arm64',
            '-o',
            'APT::Sandbox::User=root',
            '-o',
            'Acquire::Retries=3',
        ]

    def sources(self) -> str:
        uris = archives()
        suites = sorted(set(kernels.SUITES) | set(kernels.ROOT_SUITES))
        return ''.join(f'deb [arch=amd64,arm64] {uris[kernels.SUITES[s]]} {s} main\n' for s in suites)

    def update(self, force: bool = False) -> None:
        sources = self.sources()
        stamp = self.dir / 'updated'
        fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE
        if not force and (self.updated or (fresh and (self.dir / 'sources.list').read_text() == sources)):
            return
        (self.dir / 'lists' / 'partial').mkdir(parents=True, exist_ok=True)
        (self.dir / 'cache' / 'archives' / 'partial').mkdir(parents=True, exist_ok=True)
        (self.dir / 'sources.list').write_text(sources)
        with timed('apt-get update (private lists: ' + ', '.join(sorted(set(kernels.SUITES))) + ')'):
            run(['apt-get', *self.options(), 'update'], 'apt-get update')
        stamp.touch()
        self.updated = True

    def download(self, packages: list[str], arch: str, dest: Path, suite: str | None = None) -> list[Path]:
        """The .deb files of exactly these packages (no dependencies) for arch (from suite, if given)."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            for old in dest.glob('*.deb'):
                old.unlink()
            result = subprocess.run(
                [
                    'apt-get',
                    *self.options(),
                    'download',
                    *(f'{p}:{arch}' + (f'/{suite}' if suite else '') for p in packages),
                ],
                cwd=dest,
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                return sorted(dest.glob('*.deb'))
            if attempt == 1 and not self.updated:
                self.update(force=True)  # the lists may be older than the archive
        errors = [line for line in result.stderr.splitlines() if line.startswith('E:')]
        raise BuildError(
            f'cannot download {packages} ({arch}) from {", ".join(sorted(set(kernels.SUITES)))}: '
            + ' '.join(errors or result.stderr.splitlines()[-3:])
        )

    def candidates(self, prefix: str, suffix: str) -> list[str]:
        self.update()
        names = run(['apt-cache', *self.options(), 'pkgnames', prefix], 'apt-cache pkgnames').stdout.split()
        abi = [n for n in names if n.endswith(suffix) and '-cloud-' not in n and '-rt-' not in n]
        abi = [n for n in abi if re.search(r'[-+]', n.removeprefix('linux-image-').removesuffix(suffix))]
        return sorted(
            abi,
            key=lambda n: [int(x) if x.isdigit() else x for x in re.split(r'(\d+)', n)],
        )


APT = Apt()


def extract(deb: Path, dest: Path, members: list[str] | None = None) -> None:
    """A package's files (or only those matching `members`, shell patterns) into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = ['tar', '-x', '-C', str(dest)] + (['--wildcards', *members] if members else [])
    fsys = subprocess.Popen(['dpkg-deb', '--fsys-tarfile', str(deb)], stdout=subprocess.PIPE)
    result = subprocess.run(tar, stdin=fsys.stdout, capture_output=True, text=True)
    fsys.wait()
    if fsys.returncode or result.returncode:
        raise BuildError(f'cannot unpack {deb.name}: {result.stderr.strip()}')


# --- Kernels -----------------------------------------------------------------------------------


def kernel(row: kernels.Row) -> Path:
    """The folder holding the row's vmlinuz and config."""
    folder = CACHE / 'kernels' / row.kernel
    vmlinuz = folder / 'vmlinuz'
    recipe = {'version': RECIPE_VERSION, 'package': row.kernel, 'arch': row.arch}
    if recipe_matches(vmlinuz, recipe):
        return folder
    with timed(f'kernel {row.kernel}'):
        shutil.rmtree(folder, ignore_errors=True)
        work = CACHE / 'tmp' / row.kernel
        shutil.rmtree(work, ignore_errors=True)
        [deb] = APT.download([row.kernel], row.arch, work, suite=row.suite)
        extract(deb, work / 'x', ['./boot/*'])
        folder.mkdir(parents=True)
        shutil.copy(work / 'x' / 'boot' / f'config-{row.release}', folder / 'config')
        shutil.copy(work / 'x' / 'boot' / f'vmlinuz-{row.release}', vmlinuz)
        (folder / 'package').write_text(deb.name + '\n')
        shutil.rmtree(work)
        write_recipe(vmlinuz, recipe)
    return folder


# --- Roots -------------------------------------------------------------------------------------


def _root_recipe(arch: str) -> dict:
    return {
        'version': RECIPE_VERSION,
        'arch': arch,
        'suites': kernels.ROOT_SUITES,
        'packages': kernels.ROOT_PACKAGES,
        'pip': kernels.GUEST_PIP_PACKAGES,
        'archives': archives(),
    }


def _python_version(tree: Path) -> str:
    [python] = [p.name for p in (tree / 'usr' / 'lib').glob('python3.*') if re.fullmatch(r'python3\.\d+', p.name)]
    return python.removeprefix('python')


def _check_foreign_arch(arch: str) -> None:
    host = run(['dpkg', '--print-architecture'], 'dpkg').stdout.strip()
    if arch != host and subprocess.run(['arch-test', arch], capture_output=True).returncode != 0:
        raise BuildError(
            f'this machine cannot run {arch} programs (needed for the {arch} root): install '
            'qemu-user-static and binfmt-support, and mount binfmt_misc (make test-kernels does)'
        )


def root(arch: str) -> tuple[Path, dict]:
    """The root of arch, packed (root-<arch>.cpio), and what the runner needs to know about it."""
    archive = CACHE / f'root-{arch}.cpio'
    tree = CACHE / f'root-{arch}'
    recipe = _root_recipe(arch)
    if recipe_matches(archive, recipe) and (tree / 'opt' / 'venv').is_dir():
        return archive, json.loads((CACHE / f'root-{arch}.json').read_text())
    _check_foreign_arch(arch)
    uris = archives()
    shutil.rmtree(tree, ignore_errors=True)
    with timed(f'{arch} root: mmdebstrap {kernels.ROOT_SUITE}'):
        run(
            [
                'mmdebstrap',
                '--mode=root',
                '--variant=apt',
                f'--architectures={arch}',
                '--include=' + ','.join(kernels.ROOT_PACKAGES),
                '--skip=cleanup/apt/lists',
                kernels.ROOT_SUITE,
                str(tree),
                *(f'deb {uris[kernels.SUITES[s]]} {s} main' for s in kernels.ROOT_SUITES),
            ],
            f'mmdebstrap ({arch})',
        )
    python = _python_version(tree)
    venv = tree / 'opt' / 'venv'
    site = venv / 'lib' / f'python{python}' / 'site-packages'
    site.mkdir(parents=True)
    (venv / 'lib64').symlink_to('lib')
    (venv / 'bin').mkdir()
    (venv / 'bin' / 'python').symlink_to('/usr/bin/python3')
    (venv / 'bin' / 'python3').symlink_to('python')
    full_version = run(
        ['chroot', str(tree), '/usr/bin/python3', '-c', 'import platform; print(platform.python_version())'],
        "the root's python",
    ).stdout.strip()
    (venv / 'pyvenv.cfg').write_text(
        f'home = /usr/bin\ninclude-system-site-packages = true\nversion = {full_version}\n'
    )
    machine = kernels.ARCHES[arch].machine
    glibc = [f'manylinux2014_{machine}'] + [f'manylinux_2_{minor}_{machine}' for minor in range(17, 37)]
    with timed(
        f'{arch} root: pip install {" ".join(kernels.GUEST_PIP_PACKAGES)} (binary wheels for {machine}, '
        f'Python {python})'
    ):
        run(
            [
                sys.executable,
                '-m',
                'pip',
                'install',
                '-q',
                '--disable-pip-version-check',
                '--no-compile',
                '--target',
                str(site),
                '--python-version',
                python,
                '--implementation',
                'cp',
                '--abi',
                f'cp{python.replace(".", "")}',
                *(f'--platform={p}' for p in glibc),
                '--only-binary=:all:',
                *kernels.GUEST_PIP_PACKAGES,
            ],
            'pip install (guest dependencies)',
        )
        # Compiled once here: the guest runs under emulation, where every import counts.
        # (Some modules nobody imports do not compile with this Python: compileall's status is ignored.)
        subprocess.run(
            [sys.executable, '-m', 'compileall', '-q', '-j', '0', '-s', str(tree), '-p', '/', str(site)],
            capture_output=True,
        )
    (tree / 'etc' / 'hostname').write_text('ebpf-probe-vm\n')
    with timed(f'{arch} root: packing'):
        initramfs.pack_tree(tree, archive, exclude=NOT_PACKED)
    info = {'python': python, 'site_packages': '/' + str(site.relative_to(tree)), 'arch': arch}
    (CACHE / f'root-{arch}.json').write_text(json.dumps(info))
    write_recipe(archive, recipe)
    say(f'{arch} root: {archive.stat().st_size >> 20} MiB')
    return archive, info


# --- Layers ------------------------------------------------------------------------------------


def _merge_usr(folder: Path) -> None:
    """Files a package ships under /lib, /bin, /sbin go to /usr: in the root those are links, which a
    directory of the same name in a later archive would replace."""
    for name in ('lib', 'bin', 'sbin', 'lib64'):
        top = folder / name
        if top.is_dir() and not top.is_symlink():
            shutil.copytree(top, folder / 'usr' / name, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(top)


def headers_layer(row: kernels.Row) -> Path:
    """The row kernel's headers (Debian's -common and flavour packages, files only: BCC compiles
    with them; their build dependencies are not needed), with /lib/modules/<release>/build."""
    archive = CACHE / 'layers' / row.arch / f'headers-{row.release}.cpio'
    recipe = {'version': RECIPE_VERSION, 'packages': row.headers, 'arch': row.arch}
    if recipe_matches(archive, recipe):
        return archive
    with timed(f'layer headers for {row.release}'):
        work = CACHE / 'tmp' / f'headers-{row.release}'
        shutil.rmtree(work, ignore_errors=True)
        for deb in APT.download(list(row.headers), row.arch, work / 'debs', suite=row.suite):
            extract(deb, work / 'tree')
        _merge_usr(work / 'tree')
        build = work / 'tree' / 'usr' / 'lib' / 'modules' / row.release / 'build'
        if not build.is_symlink():
            raise BuildError(f'{row.headers[0]} has no /lib/modules/{row.release}/build link')
        archive.parent.mkdir(parents=True, exist_ok=True)
        initramfs.pack_tree(work / 'tree', archive)
        shutil.rmtree(work)
        write_recipe(archive, recipe)
    return archive


def _busybox_image(arch: str, dest: Path) -> None:
    """A container image as a tarball: busybox-static and its applets, for `podman import`."""
    work = CACHE / 'tmp' / f'busybox-{arch}'
    shutil.rmtree(work, ignore_errors=True)
    [deb] = APT.download(['busybox-static'], arch, work, suite=kernels.ROOT_SUITE)
    extract(deb, work / 'x')
    busybox = (work / 'x' / 'bin' / 'busybox').read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w') as tar:
        for name in ('bin', 'tmp', 'dev', 'proc', 'sys', 'etc'):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == 'tmp' else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo('bin/busybox')
        info.size, info.mode = len(busybox), 0o755
        tar.addfile(info, io.BytesIO(busybox))
        for applet in ('sh', 'dd', 'tail', 'sleep', 'cat', 'ls', 'echo', 'test', '['):
            link = tarfile.TarInfo(f'bin/{applet}')
            link.type, link.linkname = tarfile.SYMTYPE, 'busybox'
            tar.addfile(link)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(buffer.getvalue())
    shutil.rmtree(work)


PODMAN_CONF = {
    # No systemd as PID 1: the cgroupfs manager; events and logs to files; the root is the initramfs
    # (rootfs cannot be pivot_root'ed: crun moves and chroots instead).
    'etc/containers/containers.conf': """[containers]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
no_pivot_root = true
""",
    # Storage in the guest's RAM (the root is a tmpfs); vfs needs no kernel module.
    'etc/containers/storage.conf': """[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
""",
}


def apt_layer(arch: str, name: str) -> Path:
    """What installing the layer's packages in a copy of the root adds or changes."""
    layer = kernels.LAYERS[name]
    archive = CACHE / 'layers' / arch / f'{name}.cpio'
    root_archive, _ = root(arch)
    recipe = {
        'version': RECIPE_VERSION,
        'packages': layer.packages,
        'root': root_archive.stat().st_mtime,
        'files': PODMAN_CONF if name == 'podman' else None,
    }
    if recipe_matches(archive, recipe):
        return archive
    with timed(f'layer {name} ({arch}): {" ".join(layer.packages)}'):
        copy = CACHE / 'tmp' / f'layer-{arch}-{name}'
        shutil.rmtree(copy, ignore_errors=True)
        copy.parent.mkdir(parents=True, exist_ok=True)
        run(['cp', '-a', '--reflink=auto', str(CACHE / f'root-{arch}'), str(copy)], 'copying the root')
        stamp = CACHE / 'tmp' / f'layer-{arch}-{name}.stamp'
        stamp.touch()
        time.sleep(1.1)  # ctimes after the copy's
        if Path('/etc/resolv.conf').exists():
            shutil.copy('/etc/resolv.conf', copy / 'etc' / 'resolv.conf')
        env = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}
        run(['chroot', str(copy), 'apt-get', 'update', '-qq'], f'apt-get update in the {arch} root', env=env)
        run(
            ['chroot', str(copy), 'apt-get', 'install', '-y', '-qq', '--no-install-recommends', *layer.packages],
            f'apt-get install {" ".join(layer.packages)} in the {arch} root',
            env=env,
        )
        if name == 'podman':
            for path, text in PODMAN_CONF.items():
                (copy / path).parent.mkdir(parents=True, exist_ok=True)
                (copy / path).write_text(text)
            _busybox_image(arch, copy / 'opt' / 'ebpf-probe' / 'images' / 'busybox.tar')
        prune = ' -o '.join(f'-path ./{p}' for p in (*NOT_PACKED, 'etc/resolv.conf'))
        changed = run(['sh', '-c', f'find . \\( {prune} \\) -prune -o -cnewer {stamp} -print'], 'find', cwd=copy)
        paths = [p for p in changed.stdout.splitlines() if p != '.']
        archive.parent.mkdir(parents=True, exist_ok=True)
        initramfs.pack_tree(copy, archive, paths=paths)
        shutil.rmtree(copy)
        stamp.unlink()
        write_recipe(archive, recipe)
        say(f'layer {name} ({arch}): {len(paths)} paths, {archive.stat().st_size >> 20} MiB')
    return archive


def layers(row: kernels.Row) -> list[Path]:
    return [headers_layer(row) if name == 'headers' else apt_layer(row.arch, name) for name in row.layers]


def row_caches(row: kernels.Row) -> dict:
    """Everything the row boots: kernel, root and layers (built when missing)."""
    with cache_lock():
        folder = kernel(row)
        root_archive, info = root(row.arch)
        return {'kernel': folder, 'root': root_archive, 'root_info': info, 'layers': layers(row)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('rows', nargs='*', help='rows of tests/vm/kernels.py (default: all)')
    parser.add_argument('--candidates', action='store_true', help="list the archive's kernels of the rows' series")
    args = parser.parse_args()
    rows = kernels.select(' '.join(args.rows))
    if args.candidates:
        for row in rows:
            series = row.release.split('.', 2)[:2]
            prefix = f'linux-image-{series[0]}.{series[1]}.'
            flavour = '-' + row.release.rsplit('-', 1)[1]
            print(f'{row.name}: pinned {row.kernel}; the archive has: {" ".join(APT.candidates(prefix, flavour))}')
        return 0
    started = time.monotonic()
    failed = False
    for row in rows:
        try:
            row_caches(row)
        except BuildError as error:
            failed = True
            say(f'row {row.name}: {error}')
    say(f'done in {time.monotonic() - started:.0f} s')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
