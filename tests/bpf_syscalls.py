# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""libbpf calls only tests and benchmarks make: creating maps and programs, filling maps, pinning.

The product's binding (datadog_checks/ebpf_probe/kernel/libbpf.py) declares only what the
check itself calls; these use the same loaded library.
"""

from __future__ import annotations

import ctypes
import os
import struct

from datadog_checks.ebpf_probe.kernel.libbpf import (
    ENOTSUPP,
    MapBatchOpts,
    call_int,
    lib,
    map_update_elem,
    prog_test_run_result,
)


class _MapCreateOpts(ctypes.Structure):
    # struct bpf_map_create_opts, up to map_flags
    _fields_ = [
        ('sz', ctypes.c_size_t),
        ('btf_fd', ctypes.c_uint32),
        ('btf_key_type_id', ctypes.c_uint32),
        ('btf_value_type_id', ctypes.c_uint32),
        ('btf_vmlinux_value_type_id', ctypes.c_uint32),
        ('inner_map_fd', ctypes.c_uint32),
        ('map_flags', ctypes.c_uint32),
    ]


def _declare() -> ctypes.CDLL:
    bpf = lib()
    bpf.bpf_map_create.restype = ctypes.c_int
    bpf.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.c_void_p]  # fmt: skip
    bpf.bpf_map_update_batch.restype = ctypes.c_int
    bpf.bpf_map_update_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]  # fmt: skip
    bpf.bpf_prog_load.restype = ctypes.c_int
    bpf.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_void_p]  # fmt: skip
    bpf.bpf_obj_pin.restype = ctypes.c_int
    bpf.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    bpf.bpf_map_delete_elem.restype = ctypes.c_int
    bpf.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return bpf


def map_delete_elem(fd: int, key: bytes) -> None:
    call_int('bpf_map_delete_elem', _declare().bpf_map_delete_elem, fd, key)


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, inner_map_fd: int | None = None
) -> int:
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts))
    if inner_map_fd is not None:
        opts.inner_map_fd = inner_map_fd
    bpf = _declare()
    return call_int(f'bpf_map_create({name})', bpf.bpf_map_create, map_type, name.encode(), key_size, value_size,
                    max_entries, ctypes.byref(opts))  # fmt: skip


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> int:
    """Update `count` elements (keys and values packed back to back): in one call, or one by one
    where the kernel has no batch update for the map type (hash-of-maps before 5.13)."""
    n = ctypes.c_uint32(count)
    opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts))
    bpf = _declare()
    try:
        call_int('bpf_map_update_batch', bpf.bpf_map_update_batch, fd, keys, values, ctypes.byref(n),
                 ctypes.byref(opts))  # fmt: skip
    except OSError as e:
        if e.errno != ENOTSUPP:
            raise
        key_size, value_size = len(keys) // count, len(values) // count
        for i in range(count):
            map_update_elem(fd, keys[i * key_size : (i + 1) * key_size], values[i * value_size : (i + 1) * value_size])
        return count
    return n.value


class _ProgLoadOpts(ctypes.Structure):
    # struct bpf_prog_load_opts, up to expected_attach_type
    _fields_ = [('sz', ctypes.c_size_t), ('attempts', ctypes.c_int), ('expected_attach_type', ctypes.c_uint32)]


def prog_load(prog_type: int, name: str, insns: bytes, license: str = 'GPL', expected_attach_type: int = 0) -> int:
    """Load a program from raw instructions (8 bytes each)."""
    bpf = _declare()
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type)
    return call_int(f'bpf_prog_load({name})', bpf.bpf_prog_load, prog_type, name.encode(), license.encode(), insns,
                    len(insns) // 8, ctypes.byref(opts))  # fmt: skip


def link_create(prog_fd: int, target: int, attach_type: int, what: str) -> int:
    """BPF_LINK_CREATE: a link of the program to a target (an fd, or an interface's index)."""
    bpf = lib()
    bpf.bpf_link_create.restype = ctypes.c_int
    bpf.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return call_int(f'bpf_link_create({what})', bpf.bpf_link_create, prog_fd, target, attach_type, None)


def obj_pin(fd: int, path: str) -> None:
    bpf = _declare()
    call_int(f'bpf_obj_pin({path})', bpf.bpf_obj_pin, fd, path.encode())


def libbpf_version() -> str:
    bpf = lib()
    bpf.libbpf_major_version.restype = ctypes.c_uint32
    bpf.libbpf_minor_version.restype = ctypes.c_uint32
    return f'{bpf.libbpf_major_version()}.{bpf.libbpf_minor_version()}'


def prog_test_run_timed(fd: int, data: bytes, repeat: int) -> int:
    """BPF_PROG_TEST_RUN `repeat` times: the kernel's average time per run, in ns (clock reads of
    run-time statistics included when they are on)."""
    return prog_test_run_result(fd, data, repeat).duration


# --- kprobes through perf event links (tests of kprobe misses) --------------------------------------

PROG_KPROBE = 2
BPF_PERF_EVENT = 41  # enum bpf_attach_type
_PERF_EVENT_OPEN = {'x86_64': 298, 'aarch64': 241}  # syscall numbers
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack('<BBhi', code, dst | src << 4, off, imm)


# A kprobe program that calls the helper bpf_get_current_comm() (never inlined) and returns 0.
CALLS_GET_CURRENT_COMM = b''.join(
    (
        _insn(0xBF, dst=1, src=10),  # r1 = r10
        _insn(0x07, dst=1, imm=-16),  # r1 += -16: a 16-byte buffer on the stack
        _insn(0xB7, dst=2, imm=16),  # r2 = 16
        _insn(0x85, imm=16),  # call bpf_get_current_comm
        _insn(0xB7, dst=0, imm=0),  # r0 = 0
        _insn(0x95),  # exit
    )
)
RETURNS_ZERO = _insn(0xB7, dst=0, imm=0) + _insn(0x95)


def attach_kprobe(prog_fd: int, function: str, link: bool = True) -> tuple[int | None, int]:
    """Attach a kprobe program to `function` through a perf event link (5.15+), or with the perf
    event's ioctl as BCC does (no link): (link fd or None, perf event fd)."""
    with open('/sys/bus/event_source/devices/kprobe/type') as f:
        pmu_type = int(f.read())
    name = ctypes.create_string_buffer(function.encode())
    attr = bytearray(_PERF_ATTR_SIZE)
    struct.pack_into('<II', attr, 0, pmu_type, _PERF_ATTR_SIZE)
    struct.pack_into('<QQ', attr, 56, ctypes.addressof(name), 0)  # config1: the function's name, config2: offset 0
    return _perf_link(prog_fd, attr, f'kprobe {function}', link)


_PERF_EVENT_IOC_ENABLE, _PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408


def _perf_link(prog_fd: int, attr: bytearray, what: str, link: bool) -> tuple[int | None, int]:
    """Open the perf event `attr` describes (on CPU 0) and attach the program to it, by a link or
    by the ioctl: (link fd or None, perf event fd)."""
    buffer = (ctypes.c_char * _PERF_ATTR_SIZE).from_buffer(attr)
    libc = ctypes.CDLL(None, use_errno=True)
    perf_fd = libc.syscall(_PERF_EVENT_OPEN[os.uname().machine], buffer, -1, 0, -1, 8)  # pid -1, CPU 0, CLOEXEC
    if perf_fd < 0:
        raise OSError(ctypes.get_errno(), f'perf_event_open({what}) failed')
    try:
        if not link:
            for request, arg in ((_PERF_EVENT_IOC_SET_BPF, prog_fd), (_PERF_EVENT_IOC_ENABLE, 0)):
                if libc.ioctl(perf_fd, request, arg) < 0:
                    raise OSError(ctypes.get_errno(), f'ioctl({what}) failed')
            return None, perf_fd
        return link_create(prog_fd, perf_fd, BPF_PERF_EVENT, what), perf_fd
    except OSError:
        os.close(perf_fd)
        raise


PROG_TRACEPOINT = 5
_PERF_TYPE_TRACEPOINT = 2


def attach_tracepoint(
    prog_fd: int, tracefs: str, category: str, name: str, link: bool = True
) -> tuple[int | None, int]:
    """Attach a tracepoint program as attach_kprobe() does a kprobe."""
    with open(f'{tracefs}/events/{category}/{name}/id') as f:
        config = int(f.read())
    attr = bytearray(_PERF_ATTR_SIZE)
    struct.pack_into('<IIQ', attr, 0, _PERF_TYPE_TRACEPOINT, _PERF_ATTR_SIZE, config)
    return _perf_link(prog_fd, attr, f'tracepoint {category}/{name}', link)


# --- ring buffers (tests of their fill level) --------------------------------------------------------

MAP_RINGBUF = 27
BPF_FUNC_RINGBUF_OUTPUT = 130


def writes_to_ring_buffer(map_fd: int, size: int) -> bytes:
    """A program that writes one record of `size` zero bytes (a multiple of 8) to a ring buffer and returns 0."""
    stores = b''.join(_insn(0x7A, dst=10, off=-offset) for offset in range(8, size + 1, 8))  # *(u64 *)(r10 - off) = 0
    return b''.join(
        (
            stores,
            _insn(0x18, dst=1, src=1, imm=map_fd),  # r1 = the map (ld_imm64, BPF_PSEUDO_MAP_FD)
            _insn(0x00),
            _insn(0xBF, dst=2, src=10),  # r2 = r10
            _insn(0x07, dst=2, imm=-size),  # r2 += -size
            _insn(0xB7, dst=3, imm=size),  # r3 = size
            _insn(0xB7, dst=4, imm=0),  # r4 = 0 (flags)
            _insn(0x85, imm=BPF_FUNC_RINGBUF_OUTPUT),  # call bpf_ringbuf_output
            _insn(0xB7, dst=0, imm=0),  # r0 = 0
            _insn(0x95),  # exit
        )
    )


# --- what the kernel says is attached to an interface (tcx) -------------------------------------------

_BPF_SYSCALL = {'x86_64': 321, 'aarch64': 280}
_BPF_PROG_QUERY = 16


def links_on_interface(ifindex: int, attach_type: int) -> list[int]:
    """BPF_PROG_QUERY of an interface (tcx, 6.6+): the ids of the links on it, from the kernel's own list."""
    link_ids = (ctypes.c_uint32 * 64)()
    prog_ids = (ctypes.c_uint32 * 64)()
    # union bpf_attr, query: target_ifindex, attach_type, query_flags, attach_flags, prog_ids,
    # count, (pad), prog_attach_flags, link_ids, link_attach_flags, revision
    attr = bytearray(72)
    struct.pack_into('<IIIIQI', attr, 0, ifindex, attach_type, 0, 0, ctypes.addressof(prog_ids), 64)
    struct.pack_into('<Q', attr, 40, ctypes.addressof(link_ids))
    buffer = (ctypes.c_char * len(attr)).from_buffer(attr)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_BPF_SYSCALL[os.uname().machine], _BPF_PROG_QUERY, buffer, len(attr)) < 0:
        raise OSError(ctypes.get_errno(), f'BPF_PROG_QUERY(ifindex {ifindex}) failed')
    count = struct.unpack_from('<I', attr, 24)[0]
    return list(link_ids[: min(count, 64)])


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """A raw tracepoint link of the program to the tracepoint `name`."""
    bpf = lib()
    bpf.bpf_raw_tracepoint_open.restype = ctypes.c_int
    bpf.bpf_raw_tracepoint_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return call_int(f'bpf_raw_tracepoint_open({name})', bpf.bpf_raw_tracepoint_open, name.encode(), prog_fd)
