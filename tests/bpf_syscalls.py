# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""libbpf calls only tests and benchmarks make: creating maps and programs, filling maps, pinning.

The product's binding (datadog_checks/ebpf_probe/kernel/libbpf.py) declares only what the
check itself calls; these use the same loaded library.
"""

from __future__ import annotations

import ctypes

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
    return bpf


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


def prog_load(prog_type: int, name: str, insns: bytes, license: str = 'GPL') -> int:
    """Load a program from raw instructions (8 bytes each)."""
    bpf = _declare()
    return call_int(f'bpf_prog_load({name})', bpf.bpf_prog_load, prog_type, name.encode(), license.encode(), insns,
                    len(insns) // 8, None)  # fmt: skip


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
