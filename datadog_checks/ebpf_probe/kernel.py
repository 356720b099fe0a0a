# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the running kernel and this process allow, measured, with what to do about each gap."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import resource
import struct
import threading
from collections.abc import Iterator

VMLINUX_BTF = '/sys/kernel/btf/vmlinux'
TRACEFS_MOUNTS = ('/sys/kernel/tracing', '/sys/kernel/debug/tracing')
KPROBE_PMU = '/sys/bus/event_source/devices/kprobe/type'
KALLSYMS = '/proc/kallsyms'
LOCKDOWN = '/sys/kernel/security/lockdown'

# Oldest kernel with everything the BCC variant uses (raw tracepoints, bpf_get_stack).
MIN_KERNEL = (4, 18)
# CAP_BPF and CAP_PERFMON split off CAP_SYS_ADMIN in 5.8.
CAP_BPF_KERNEL = (5, 8)
# From 5.11 BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK.
MEMCG_ACCOUNTING_KERNEL = (5, 11)

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAPABILITY_NAMES = {CAP_SYS_ADMIN: 'CAP_SYS_ADMIN', CAP_PERFMON: 'CAP_PERFMON', CAP_BPF: 'CAP_BPF'}


class RequirementError(RuntimeError):
    """Something the probe needs is missing; the message says what to do."""


def kernel_release() -> str:
    return os.uname().release


def kernel_version(release: str | None = None) -> tuple[int, int, int]:
    """(major, minor, patch) from a release string such as '6.18.44-fc-v657'."""
    match = re.match(r'(\d+)\.(\d+)(?:\.(\d+))?', release or kernel_release())
    if not match:
        return (0, 0, 0)
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def effective_capabilities(status_path: str = '/proc/self/status') -> int:
    """This process's effective capability set, as a bit mask."""
    with open(status_path) as f:
        for line in f:
            if line.startswith('CapEff:'):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(caps: int, version: tuple[int, int, int]) -> list[str]:
    """Capabilities BPF tracing needs that `caps` lacks (empty when enough)."""
    if caps & (1 << CAP_SYS_ADMIN):
        return []
    if version[:2] < CAP_BPF_KERNEL:
        return ['CAP_SYS_ADMIN']
    return [CAPABILITY_NAMES[c] for c in (CAP_BPF, CAP_PERFMON) if not caps & (1 << c)]


def check_privileges(version: tuple[int, int, int] | None = None) -> None:
    version = version or kernel_version()
    missing = missing_capabilities(effective_capabilities(), version)
    if missing:
        if version[:2] < CAP_BPF_KERNEL:
            need = 'CAP_SYS_ADMIN (this kernel predates CAP_BPF)'
        else:
            need = 'CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN'
        raise RequirementError(
            f'missing capabilities {", ".join(missing)}: loading eBPF tracing programs needs {need}; '
            'run the Agent as root or grant them (Kubernetes: securityContext.capabilities.add)'
        )


def check_kernel_version(version: tuple[int, int, int] | None = None) -> None:
    version = version or kernel_version()
    if version[:2] < MIN_KERNEL:
        raise RequirementError(
            f'kernel {kernel_release()} is too old: the OOM kill probe needs Linux '
            f'{MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer'
        )


def check_lockdown(path: str = LOCKDOWN) -> None:
    try:
        with open(path) as f:
            mode = f.read()
    except OSError:
        return  # securityfs not mounted or no lockdown LSM: nothing to refuse us
    if '[confidentiality]' in mode:
        raise RequirementError(
            'kernel lockdown is "confidentiality", which forbids eBPF programs from reading kernel memory; '
            'boot with lockdown=integrity or none to use this check'
        )


def raise_memlock_limit(version: tuple[int, int, int] | None = None) -> None:
    """Before 5.11, BPF maps count against RLIMIT_MEMLOCK: lift it, or say how."""
    version = version or kernel_version()
    if version[:2] >= MEMCG_ACCOUNTING_KERNEL:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError) as e:
        raise RequirementError(
            f'the locked-memory limit is {soft} bytes and cannot be raised ({e}); on kernels before 5.11 '
            'BPF maps count against it: start the Agent with LimitMEMLOCK=infinity (systemd) or '
            'ulimit -l unlimited, or grant CAP_SYS_RESOURCE'
        ) from None


def has_vmlinux_btf() -> bool:
    return os.path.exists(VMLINUX_BTF)


_BTF_HEADER = struct.Struct('<HBBIIIII')  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_BTF_MAGIC = 0xEB9F
_BTF_KIND_FUNC = 12
_BTF_KIND_STRUCT = 4


class VmlinuxBtf:
    """The kernel's BTF, looked up without parsing all of it.

    libbpf's parse of the whole vmlinux BTF costs ~7 ms, and libbpf does it again when it loads a
    CO-RE object. To know whether a type exists, this finds its name in the string section, then
    the type records naming it: about 0.5 ms, with the file mapped (6.16+) rather than copied.
    Raises OSError (or ValueError for a file that is not BTF) when it cannot read the BTF.
    """

    def __init__(self, path: str = VMLINUX_BTF):
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                self._data: bytes | mmap.mmap = mmap.mmap(
                    fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ
                )
            except (OSError, ValueError):
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                self._data = b''.join(chunks)
        finally:
            os.close(fd)
        if len(self._data) < _BTF_HEADER.size or _BTF_HEADER.unpack_from(self._data)[0] != _BTF_MAGIC:
            self.close()
            raise ValueError(f'{path} is not BTF')
        _magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _BTF_HEADER.unpack_from(self._data)
        self._types, self._types_end = hdr_len + type_off, hdr_len + type_off + type_len
        self._strings, self._strings_end = hdr_len + str_off, hdr_len + str_off + str_len

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        self._data = b''

    def __enter__(self) -> VmlinuxBtf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _name(self, offset: int) -> str:
        start = self._strings + offset
        if start >= self._strings_end:
            return ''
        return self._data[start : self._data.find(b'\0', start, self._strings_end)].decode('ascii', 'replace')

    def _records(self, name: str, kind: int) -> Iterator[tuple[int, int]]:
        """(position, info) of each type record of that kind and name."""
        data = self._data
        at = data.find(b'\0' + name.encode() + b'\0', self._strings, self._strings_end)
        if at < 0:
            return
        needle = struct.pack('<I', at + 1 - self._strings)
        position = self._types
        while (position := data.find(needle, position, self._types_end)) >= 0:
            if (position - self._types) % 4 == 0:
                info = struct.unpack_from('<I', data, position + 4)[0]
                if (info >> 24) & 0x1F == kind:
                    yield position, info
            position += 1

    def has_function(self, name: str) -> bool:
        """Whether the kernel has a function of that name in its BTF (kfuncs are listed so)."""
        return next(self._records(name, _BTF_KIND_FUNC), None) is not None

    def has_struct(self, name: str) -> bool:
        return next(self._records(name, _BTF_KIND_STRUCT), None) is not None

    def struct_members(self, name: str) -> list[str] | None:
        """Member names of a struct; None when absent or when it has anonymous members (ask libbpf)."""
        for position, info in self._records(name, _BTF_KIND_STRUCT):
            members = struct.iter_unpack('<III', self._data[position + 12 : position + 12 + 12 * (info & 0xFFFF)])
            names = [self._name(m[0]) for m in members]
            if names and all(names):
                return names
        return None


def btf_struct_members(struct_name: str, path: str = VMLINUX_BTF) -> list[str] | None:
    """Member names of a struct in the kernel's BTF (see VmlinuxBtf); None when it cannot tell."""
    try:
        with VmlinuxBtf(path) as btf:
            return btf.struct_members(struct_name)
    except (OSError, ValueError):
        return None


def tracefs_path() -> str | None:
    """Where tracefs is mounted (its events folder is readable), or None."""
    for path in TRACEFS_MOUNTS:
        if os.path.isdir(os.path.join(path, 'events')):
            return path
    return None


def mount_tracefs(path: str = TRACEFS_MOUNTS[0]) -> str:
    """Mount tracefs at `path` with the mount(2) system call (no shell)."""
    libc = ctypes.CDLL(None, use_errno=True)  # libc, already loaded: no ldconfig run
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b'tracefs', path.encode(), b'tracefs', 0, None) != 0:
        err = ctypes.get_errno()
        raise RequirementError(
            f'tracefs is not mounted and mounting it at {path} failed: {os.strerror(err)}; '
            f"mount it (mount -t tracefs tracefs {path}) or, in a container, mount the host's {path}"
        )
    return path


def ensure_tracefs(mount_allowed: bool) -> str:
    path = tracefs_path()
    if path:
        return path
    if not mount_allowed:
        raise RequirementError(
            f'tracefs is not mounted: mount it (mount -t tracefs tracefs {TRACEFS_MOUNTS[0]}) '
            'or set mount_tracefs: true'
        )
    return mount_tracefs()


def kprobe_support() -> tuple[bool, str]:
    """Whether kprobes can be attached here, and why not."""
    if os.path.exists(KPROBE_PMU):
        return True, ''
    tracefs = tracefs_path()
    if tracefs and os.path.exists(os.path.join(tracefs, 'kprobe_events')):
        return True, ''
    return False, (
        f'the kernel offers no kprobes (no {KPROBE_PMU} and no kprobe_events in tracefs): '
        'it was built without CONFIG_KPROBES'
    )


def tracepoint_format(tracefs: str, category: str, event: str) -> str | None:
    """The format file of a classic tracepoint, or None if the kernel has no such event."""
    try:
        with open(os.path.join(tracefs, 'events', category, event, 'format')) as f:
            return f.read()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def tracepoint_fields(format_text: str) -> list[str]:
    """Names of a tracepoint's own fields (not the common_ ones) from its format file."""
    names = []
    for match in re.finditer(r'field:([^;]+);', format_text):
        # 'int pid', 'char comm[16]', '__data_loc char[] comm': drop array brackets, keep the last word.
        declaration = re.sub(r'\[[^\]]*\]', '', match.group(1)).strip()
        name = re.split(r'[\s*]+', declaration)[-1]
        if not name.startswith('common_'):
            names.append(name)
    return names


class KernelSymbols:
    """Address ranges of a few kernel functions, from /proc/kallsyms, read once on demand.

    Only the wanted functions are kept (the whole table would cost megabytes). Reading the
    file costs tens of milliseconds (the kernel formats 5 MB of text), so prefetch() does it
    in the background as soon as it is known to be needed.
    """

    def __init__(self, names: frozenset[str], path: str = KALLSYMS):
        self._names = names
        self._path = path
        self._ranges: dict[str, tuple[int, int]] | None = None
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        if self._ranges is None:
            threading.Thread(target=self.ranges, name='ebpf-probe-kallsyms', daemon=True).start()

    def ranges(self) -> dict[str, tuple[int, int]]:
        """name -> [start, end) of each wanted function found with a real address."""
        with self._lock:
            if self._ranges is None:
                self._ranges = self._read()
            return self._ranges

    def _read(self) -> dict[str, tuple[int, int]]:
        try:
            with open(self._path, 'rb') as f:
                data = f.read()
        except OSError:
            return {}
        ranges: dict[str, tuple[int, int]] = {}
        for name in self._names:
            for kind in (b' t ', b' T '):
                at = data.find(kind + name.encode() + b'\n')
                if at < 0:
                    continue
                start = int(data[data.rfind(b'\n', 0, at) + 1 : at], 16)
                end = self._next_address(data, at + len(kind) + len(name) + 1, start)
                if start and end:  # zero addresses: kallsyms hidden by kptr_restrict
                    ranges[name] = (start, end)
                break
        return ranges

    @staticmethod
    def _next_address(data: bytes, line: int, start: int) -> int | None:
        """A function ends where the next symbol at a higher address starts."""
        while line < len(data):
            space = data.find(b' ', line)
            if space < 0:
                return None
            address = int(data[line:space], 16)
            if address > start:
                return address
            line = data.find(b'\n', space) + 1
            if line == 0:
                return None
        return None

    def find(self, address: int) -> str | None:
        for name, (start, end) in self.ranges().items():
            if start <= address < end:
                return name
        return None
