# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the running kernel offers the probes, measured rather than inferred from its version."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import struct

from . import uapi
from .requirements import RequirementError

TRACEFS_MOUNTS = ('/sys/kernel/tracing', '/sys/kernel/debug/tracing')
KPROBE_PMU = '/sys/bus/event_source/devices/kprobe/type'

# The bpf(2) system call's number, for the one feature probe made without libbpf.
_SYS_BPF = {'x86_64': 321, 'aarch64': 280}
_libc = ctypes.CDLL(None, use_errno=True)  # libc, already loaded: no ldconfig run


def tracefs_path() -> str | None:
    """Where tracefs is mounted (its events folder is readable), or None."""
    for path in TRACEFS_MOUNTS:
        if os.path.isdir(os.path.join(path, 'events')):
            return path
    return None


def mount_tracefs(path: str = TRACEFS_MOUNTS[0]) -> str:
    """Mount tracefs at `path` with the mount(2) system call (no shell)."""
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if _libc.mount(b'tracefs', path.encode(), b'tracefs', 0, None) != 0:
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


def has_ring_buffer() -> bool:
    """Whether the kernel has BPF ring buffers (5.8+): it lets us create one.

    One bpf(BPF_MAP_CREATE) call, the same for the CO-RE and the BCC paths (BCC may run where
    libbpf cannot be loaded).
    """
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        return False
    page = os.sysconf('SC_PAGE_SIZE')
    # union bpf_attr, map-create part: map_type, key_size, value_size, max_entries, map_flags...
    attr = ctypes.create_string_buffer(struct.pack('<IIII', uapi.BPF_MAP_TYPE_RINGBUF, 0, 0, page), 72)
    _libc.syscall.restype = ctypes.c_long
    fd = _libc.syscall(ctypes.c_long(number), ctypes.c_int(uapi.BPF_MAP_CREATE), attr, ctypes.c_uint(72))
    if fd < 0:
        return False
    os.close(fd)
    return True


def memory_cgroup_v2() -> bool:
    """Whether the memory controller is on cgroup v2, where the kernel keeps memory.events and
    pressure (PSI) per cgroup: /proc/cgroups puts it on hierarchy 0, enabled (a v1 mount would give
    it a hierarchy of its own)."""
    try:
        with open('/proc/cgroups') as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == 'memory':
                    return fields[1] == '0' and fields[3] == '1'
    except (OSError, IndexError):
        pass
    return False


def has_pressure_stall_info() -> bool:
    """Whether the kernel keeps pressure stall information (CONFIG_PSI, not disabled at boot)."""
    return os.path.exists('/proc/pressure/memory')


# The initial pid namespace's inode number (PROC_PID_INIT_INO, include/linux/proc_ns.h).
HOST_PID_NAMESPACE = 'pid:[4026531836]'


def in_host_pid_namespace(link: str = '/proc/self/ns/pid') -> bool:
    """Whether this process sees the host's pids (Kubernetes: hostPID), as the kernel gives them to BPF programs."""
    try:
        return os.readlink(link) == HOST_PID_NAMESPACE
    except OSError:
        return True  # no namespaces to tell: the only one there is
