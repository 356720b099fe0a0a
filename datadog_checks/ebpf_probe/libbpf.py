# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""A thin, typed ctypes layer over libbpf.so.1: the copy the wheel carries, else the host's.

No well-kept Python binding of libbpf exists, so this module declares the few
libbpf calls the probes use and nothing else. Every failing call raises
LibbpfError, which carries errno and the messages libbpf printed during the
call (for example the verifier log), so errors say what went wrong.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .resources import PACKAGE_DIR

LIBBPF_SONAME = 'libbpf.so.1'
# Built into the package by `make bundle` (libbpf 1.5.0, libelf and zlib linked in): a known
# version, the one the structures below are tested against, on hosts that have no libbpf at all.
BUNDLED_LIBBPF = PACKAGE_DIR / 'data' / 'lib' / LIBBPF_SONAME


def library_candidates() -> list[str]:
    """What to load, in order: the bundled libbpf when present, then the host's by soname."""
    bundled = [str(BUNDLED_LIBBPF)] if BUNDLED_LIBBPF.is_file() else []
    return bundled + [LIBBPF_SONAME]


# enum bpf_map_type, bpf_prog_type, bpf_stats_type (include/uapi/linux/bpf.h)
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACING = 26
BPF_STATS_RUN_TIME = 0

# BTF kinds (include/uapi/linux/btf.h)
BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_FWD = 7
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19
_BTF_MODIFIERS = (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG)

# enum libbpf_print_level
LIBBPF_DEBUG = 2

# How many of libbpf's last messages an error keeps.
_LOG_LINES_KEPT = 40


class LibbpfError(OSError):
    """A libbpf call failed. `errno` is set; `log` holds libbpf's messages during the call."""

    def __init__(self, call: str, err: int, log: list[str] | None = None):
        self.call = call
        self.log = list(log or [])
        message = f'{call} failed: {os.strerror(err)} (errno {err})'
        details = _useful_log_lines(self.log)
        if details:
            message += '; libbpf: ' + ' | '.join(details)
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.strerror or ''


def _useful_log_lines(log: list[str]) -> list[str]:
    """The lines of a libbpf log worth showing a user: warnings and the verifier's verdict."""
    lines = [line.strip() for line in log if line.strip()]
    keep = [line for line in lines if not line.startswith('libbpf: prog ') or 'failed' in line or 'error' in line]
    return keep[-6:]


class _LibbpfLog(threading.local):
    lines: list[str] | None = None


_log = _LibbpfLog()
_debug_log = logging.getLogger('datadog_checks.ebpf_probe.libbpf')
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _BpfObjectOpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts up to btf_custom_path, which every libbpf 1.x has.
    # libbpf reads `sz` and accepts a shorter struct than its own.
    _fields_ = [
        ('sz', ctypes.c_size_t),
        ('object_name', ctypes.c_char_p),
        ('relaxed_maps', ctypes.c_bool),
        ('pin_root_path', ctypes.c_char_p),
        ('_attach_prog_fd', ctypes.c_uint32),
        ('kconfig', ctypes.c_char_p),
        ('btf_custom_path', ctypes.c_char_p),
    ]


class _BtfType(ctypes.Structure):
    _fields_ = [('name_off', ctypes.c_uint32), ('info', ctypes.c_uint32), ('size_or_type', ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [('name_off', ctypes.c_uint32), ('type', ctypes.c_uint32), ('offset', ctypes.c_uint32)]


class _BtfArray(ctypes.Structure):
    _fields_ = [('type', ctypes.c_uint32), ('index_type', ctypes.c_uint32), ('nelems', ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [('name_off', ctypes.c_uint32), ('val', ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [('name_off', ctypes.c_uint32), ('val_lo32', ctypes.c_uint32), ('val_hi32', ctypes.c_uint32)]


class _BtfParam(ctypes.Structure):
    _fields_ = [('name_off', ctypes.c_uint32), ('type', ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [('type', ctypes.c_uint32), ('offset', ctypes.c_uint32), ('size', ctypes.c_uint32)]


BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h); the kernel fills as much as it knows."""

    _fields_ = [
        ('type', ctypes.c_uint32),
        ('id', ctypes.c_uint32),
        ('tag', ctypes.c_uint8 * BPF_TAG_SIZE),
        ('jited_prog_len', ctypes.c_uint32),
        ('xlated_prog_len', ctypes.c_uint32),
        ('jited_prog_insns', ctypes.c_uint64),
        ('xlated_prog_insns', ctypes.c_uint64),
        ('load_time', ctypes.c_uint64),
        ('created_by_uid', ctypes.c_uint32),
        ('nr_map_ids', ctypes.c_uint32),
        ('map_ids', ctypes.c_uint64),
        ('name', ctypes.c_char * BPF_OBJ_NAME_LEN),
        ('ifindex', ctypes.c_uint32),
        ('gpl_compatible', ctypes.c_uint32),
        ('netns_dev', ctypes.c_uint64),
        ('netns_ino', ctypes.c_uint64),
        ('nr_jited_ksyms', ctypes.c_uint32),
        ('nr_jited_func_lens', ctypes.c_uint32),
        ('jited_ksyms', ctypes.c_uint64),
        ('jited_func_lens', ctypes.c_uint64),
        ('btf_id', ctypes.c_uint32),
        ('func_info_rec_size', ctypes.c_uint32),
        ('func_info', ctypes.c_uint64),
        ('nr_func_info', ctypes.c_uint32),
        ('nr_line_info', ctypes.c_uint32),
        ('line_info', ctypes.c_uint64),
        ('jited_line_info', ctypes.c_uint64),
        ('nr_jited_line_info', ctypes.c_uint32),
        ('line_info_rec_size', ctypes.c_uint32),
        ('jited_line_info_rec_size', ctypes.c_uint32),
        ('nr_prog_tags', ctypes.c_uint32),
        ('prog_tags', ctypes.c_uint64),
        ('run_time_ns', ctypes.c_uint64),
        ('run_cnt', ctypes.c_uint64),
        ('recursion_misses', ctypes.c_uint64),
        ('verified_insns', ctypes.c_uint32),
        ('attach_btf_obj_id', ctypes.c_uint32),
        ('attach_btf_id', ctypes.c_uint32),
        ('_pad', ctypes.c_uint32),
    ]


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ('type', ctypes.c_uint32),
        ('id', ctypes.c_uint32),
        ('key_size', ctypes.c_uint32),
        ('value_size', ctypes.c_uint32),
        ('max_entries', ctypes.c_uint32),
        ('map_flags', ctypes.c_uint32),
        ('name', ctypes.c_char * BPF_OBJ_NAME_LEN),
        ('ifindex', ctypes.c_uint32),
        ('btf_vmlinux_value_type_id', ctypes.c_uint32),
        ('netns_dev', ctypes.c_uint64),
        ('netns_ino', ctypes.c_uint64),
        ('btf_id', ctypes.c_uint32),
        ('btf_key_type_id', ctypes.c_uint32),
        ('btf_value_type_id', ctypes.c_uint32),
        ('_pad', ctypes.c_uint32),
        ('map_extra', ctypes.c_uint64),
    ]


class _BpfFuncInfo(ctypes.Structure):
    _fields_ = [('insn_off', ctypes.c_uint32), ('type_id', ctypes.c_uint32)]


class _MapBatchOpts(ctypes.Structure):
    _fields_ = [('sz', ctypes.c_size_t), ('elem_flags', ctypes.c_uint64), ('flags', ctypes.c_uint64)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ('sz', ctypes.c_size_t),
        ('data_in', ctypes.c_void_p),
        ('data_out', ctypes.c_void_p),
        ('data_size_in', ctypes.c_uint32),
        ('data_size_out', ctypes.c_uint32),
        ('ctx_in', ctypes.c_void_p),
        ('ctx_out', ctypes.c_void_p),
        ('ctx_size_in', ctypes.c_uint32),
        ('ctx_size_out', ctypes.c_uint32),
        ('retval', ctypes.c_uint32),
        ('repeat', ctypes.c_int),
        ('duration', ctypes.c_uint32),
        ('flags', ctypes.c_uint32),
        ('cpu', ctypes.c_uint32),
        ('batch_size', ctypes.c_uint32),
    ]


RingBufferCallback = Callable[[bytes], None]
_RING_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PERF_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
_PERF_BUFFER_LOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64)

_P = ctypes.c_void_p
_I = ctypes.c_int
_U32 = ctypes.c_uint32
_S = ctypes.c_char_p

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    'libbpf_set_print': (_P, [_PRINT_FN]),
    'libbpf_major_version': (_U32, []),
    'libbpf_minor_version': (_U32, []),
    'libbpf_probe_bpf_map_type': (_I, [_I, _P]),
    'libbpf_probe_bpf_prog_type': (_I, [_I, _P]),
    'bpf_object__open_file': (_P, [_S, ctypes.POINTER(_BpfObjectOpenOpts)]),
    'bpf_object__load': (_I, [_P]),
    'bpf_object__close': (None, [_P]),
    'bpf_object__btf': (_P, [_P]),
    'bpf_object__find_program_by_name': (_P, [_P, _S]),
    'bpf_object__find_map_by_name': (_P, [_P, _S]),
    'bpf_program__set_autoload': (_I, [_P, ctypes.c_bool]),
    'bpf_program__attach': (_P, [_P]),
    'bpf_program__fd': (_I, [_P]),
    'bpf_program__name': (_S, [_P]),
    'bpf_link__destroy': (_I, [_P]),
    'bpf_link__fd': (_I, [_P]),
    'bpf_map__fd': (_I, [_P]),
    'bpf_map__name': (_S, [_P]),
    'bpf_map__set_type': (_I, [_P, _I]),
    'bpf_map__set_max_entries': (_I, [_P, _U32]),
    'bpf_map__max_entries': (_U32, [_P]),
    'bpf_map__set_key_size': (_I, [_P, _U32]),
    'bpf_map__set_value_size': (_I, [_P, _U32]),
    'bpf_map__initial_value': (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    'bpf_map_lookup_elem': (_I, [_I, _P, _P]),
    'ring_buffer__new': (_P, [_I, _RING_BUFFER_SAMPLE_FN, _P, _P]),
    'ring_buffer__consume': (_I, [_P]),
    'ring_buffer__free': (None, [_P]),
    'perf_buffer__new': (_P, [_I, ctypes.c_size_t, _PERF_BUFFER_SAMPLE_FN, _PERF_BUFFER_LOST_FN, _P, _P]),
    'perf_buffer__consume': (_I, [_P]),
    'perf_buffer__free': (None, [_P]),
    'btf__load_vmlinux_btf': (_P, []),
    'btf__parse': (_P, [_S, _P]),
    'btf__free': (None, [_P]),
    'btf__find_by_name_kind': (ctypes.c_int32, [_P, _S, _U32]),
    'btf__type_by_id': (ctypes.POINTER(_BtfType), [_P, _U32]),
    'btf__name_by_offset': (_S, [_P, _U32]),
    'btf__resolve_size': (ctypes.c_int64, [_P, _U32]),
    'btf__type_cnt': (_U32, [_P]),
    'btf__load_from_kernel_by_id': (_P, [_U32]),
    'libbpf_bpf_prog_type_str': (_S, [_I]),
    'libbpf_bpf_map_type_str': (_S, [_I]),
    'bpf_program__attach_iter': (_P, [_P, _P]),
    'bpf_map__reuse_fd': (_I, [_P, _I]),
    'bpf_iter_create': (_I, [_I]),
    'bpf_prog_get_next_id': (_I, [_U32, ctypes.POINTER(_U32)]),
    'bpf_map_get_next_id': (_I, [_U32, ctypes.POINTER(_U32)]),
    'bpf_link_get_next_id': (_I, [_U32, ctypes.POINTER(_U32)]),
    'bpf_prog_get_fd_by_id': (_I, [_U32]),
    'bpf_map_get_fd_by_id': (_I, [_U32]),
    'bpf_obj_get_info_by_fd': (_I, [_I, _P, ctypes.POINTER(_U32)]),
    'bpf_obj_get': (_I, [_S]),
    'bpf_obj_pin': (_I, [_I, _S]),
    'bpf_enable_stats': (_I, [_I]),
    'bpf_map_create': (_I, [_I, _S, _U32, _U32, _U32, _P]),
    'bpf_map_update_batch': (_I, [_I, _P, _P, ctypes.POINTER(_U32), _P]),
    'bpf_map_lookup_batch': (_I, [_I, _P, _P, _P, _P, ctypes.POINTER(_U32), _P]),
    'bpf_map_get_next_key': (_I, [_I, _P, _P]),
    'bpf_map_update_elem': (_I, [_I, _P, _P, ctypes.c_uint64]),
    'bpf_prog_load': (_I, [_I, _S, _S, _P, ctypes.c_size_t, _P]),
    'bpf_prog_test_run_opts': (_I, [_I, _P]),
}


class _Libbpf:
    """libbpf.so.1, loaded on first use, with the print callback installed once."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._lock = threading.Lock()
        self._print_fn = _PRINT_FN(self._on_print)
        self._libc = ctypes.CDLL(None, use_errno=True)  # libc, already loaded: no ldconfig run
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def _on_print(self, level: int, fmt: bytes, va_list: int) -> int:
        # The va_list arrives as a pointer on x86-64 and arm64; vsnprintf formats it. libbpf's
        # debug lines (hundreds per load) are formatted only when someone wants them.
        lines = _log.lines
        if level == LIBBPF_DEBUG and not _debug_log.isEnabledFor(logging.DEBUG):
            return 0
        if lines is not None:
            buf = ctypes.create_string_buffer(1024)
            self._libc.vsnprintf(buf, len(buf), fmt, va_list)
            lines.append(buf.value.decode('utf-8', 'replace'))
            del lines[:-_LOG_LINES_KEPT]
        return 0

    def get(self) -> ctypes.CDLL:
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    lib = _load_first(library_candidates())
                    for name, (restype, argtypes) in _SIGNATURES.items():
                        func = getattr(lib, name, None)
                        if func is None:
                            continue  # absent from this libbpf: the caller checks has()
                        func.restype = restype
                        func.argtypes = argtypes
                    lib.libbpf_set_print(self._print_fn)
                    self._lib = lib
        return self._lib


def _load_first(candidates: list[str]) -> ctypes.CDLL:
    errors = []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError as e:
            errors.append(f'{path}: {e}')
            continue
        if errors:
            _debug_log.warning(
                'the bundled libbpf does not load, the host libbpf.so.1 is used instead: %s', '; '.join(errors)
            )
        _debug_log.info('libbpf %d.%d loaded from %s', lib.libbpf_major_version(), lib.libbpf_minor_version(), path)
        return lib
    raise LibbpfUnavailable(
        f'cannot load libbpf ({"; ".join(errors)}): reinstall the wheel, which carries it, '
        f'or install libbpf 1.x (Debian/Ubuntu: libbpf1)'
    )


class LibbpfUnavailable(RuntimeError):
    """Neither the bundled libbpf nor the host's libbpf.so.1 can be loaded."""


_LIBBPF = _Libbpf()


def lib() -> ctypes.CDLL:
    return _LIBBPF.get()


def has(name: str) -> bool:
    return hasattr(lib(), name)


def version() -> tuple[int, int]:
    return int(lib().libbpf_major_version()), int(lib().libbpf_minor_version())


@contextmanager
def capture_log() -> Iterator[list[str]]:
    outer = _log.lines
    lines: list[str] = []
    _log.lines = lines
    try:
        yield lines
    finally:
        _log.lines = outer
        if outer is not None:
            outer.extend(lines)


def _call_ptr(call: str, func: Any, *args: Any) -> int:
    """Call a libbpf function returning a pointer: NULL means failure, errno says why."""
    with capture_log() as log:
        ctypes.set_errno(0)
        ptr = func(*args)
        if not ptr:
            raise LibbpfError(call, ctypes.get_errno() or errno.EINVAL, log)
    return ptr


def _call_int(call: str, func: Any, *args: Any) -> int:
    """Call a libbpf function returning an int: a negative value is -errno."""
    with capture_log() as log:
        ret = func(*args)
        if ret < 0:
            raise LibbpfError(call, -ret, log)
    return ret


def probe_map_type(map_type: int) -> bool:
    """Whether the running kernel supports a map type (libbpf_probe_bpf_map_type)."""
    with capture_log():
        return lib().libbpf_probe_bpf_map_type(map_type, None) == 1


# --- Objects already in the kernel: enumerate, open by id, describe ------------

_NEXT_ID = {'prog': 'bpf_prog_get_next_id', 'map': 'bpf_map_get_next_id', 'link': 'bpf_link_get_next_id'}
_FD_BY_ID = {'prog': 'bpf_prog_get_fd_by_id', 'map': 'bpf_map_get_fd_by_id'}


def object_ids(kind: str) -> Iterator[int]:
    """Ids of every program, map or link in the kernel, in increasing order."""
    func = getattr(lib(), _NEXT_ID[kind])
    current = ctypes.c_uint32(0)
    while True:
        ret = func(current.value, ctypes.byref(current))
        if ret == -errno.ENOENT:
            return
        if ret < 0:
            raise LibbpfError(f'{_NEXT_ID[kind]}', -ret)
        yield current.value


def fd_by_id(kind: str, object_id: int) -> int | None:
    """An fd for the object with this id; None if it went away meanwhile. The caller closes it."""
    ret = getattr(lib(), _FD_BY_ID[kind])(object_id)
    if ret == -errno.ENOENT:
        return None
    if ret < 0:
        raise LibbpfError(f'{_FD_BY_ID[kind]}({object_id})', -ret)
    return ret


def open_objects(kind: str) -> Iterator[tuple[int, int]]:
    """(id, fd) of every program or map in the kernel, the way bpftool lists them.

    Each fd is closed as soon as the loop moves on; an object unloaded meanwhile is skipped.
    """
    for object_id in object_ids(kind):
        fd = fd_by_id(kind, object_id)
        if fd is None:
            continue
        try:
            yield object_id, fd
        finally:
            os.close(fd)


def _info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        raise LibbpfError('bpf_obj_get_info_by_fd', -ret)


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    _info(fd, info)
    return info


def prog_map_ids(fd: int, count: int) -> list[int]:
    """Ids of the maps a program uses (count from a first prog_info())."""
    if count <= 0:
        return []
    ids = (ctypes.c_uint32 * count)()
    info = BpfProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    _info(fd, info)
    return list(ids[: min(count, info.nr_map_ids)])


def prog_btf_func_name(fd: int, info: BpfProgInfo) -> str | None:
    """The program's full function name from its BTF (the kernel keeps only 15 characters)."""
    if not info.btf_id or not info.nr_func_info or info.func_info_rec_size < ctypes.sizeof(_BpfFuncInfo):
        return None
    buf = ctypes.create_string_buffer(info.func_info_rec_size)
    query = BpfProgInfo(nr_func_info=1, func_info_rec_size=info.func_info_rec_size, func_info=ctypes.addressof(buf))
    _info(fd, query)
    type_id = _BpfFuncInfo.from_buffer(buf).type_id
    with capture_log():
        ptr = lib().btf__load_from_kernel_by_id(info.btf_id)
    if not ptr:
        return None
    with Btf(ptr, owned=True) as btf:
        return btf.name(type_id) or None


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    _info(fd, info)
    return info


def prog_type_name(prog_type: int) -> str:
    name = lib().libbpf_bpf_prog_type_str(prog_type)
    return name.decode() if name else f'type_{prog_type}'


def map_type_name(map_type: int) -> str:
    name = lib().libbpf_bpf_map_type_str(map_type)
    return name.decode() if name else f'type_{map_type}'


def obj_get(path: str) -> int:
    """An fd for a pinned object."""
    return _call_int(f'bpf_obj_get({path})', lib().bpf_obj_get, path.encode())


def obj_pin(fd: int, path: str) -> None:
    """Pin an object in bpffs (tests use it to make pinned-only objects)."""
    _call_int(f'bpf_obj_pin({path})', lib().bpf_obj_pin, fd, path.encode())


def enable_stats(stats_type: int = BPF_STATS_RUN_TIME) -> int:
    """BPF_ENABLE_STATS: stats stay on while the returned fd is open (close it to turn them off)."""
    return _call_int('bpf_enable_stats', lib().bpf_enable_stats, stats_type)


def read_iterator(link: Link, chunk: int = 65536) -> bytes:
    """Run a BPF iterator once: everything its program wrote for this pass."""
    fd = _call_int(f'bpf_iter_create({link.program})', lib().bpf_iter_create, link.fd)
    try:
        parts: list[bytes] = []
        while True:
            data = os.read(fd, chunk)
            if not data:
                return b''.join(parts)
            parts.append(data)
    finally:
        os.close(fd)


# --- Maps and programs made from user space (fallback counting, tests, benchmarks) ---


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    return _call_int(
        f'bpf_map_create({name})', lib().bpf_map_create, map_type, name.encode(), key_size, value_size, max_entries,
        None,
    )  # fmt: skip


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _call_int('bpf_map_update_elem', lib().bpf_map_update_elem, fd, key, value, flags)


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> int:
    """Update `count` elements at once (keys and values packed back to back)."""
    n = ctypes.c_uint32(count)
    opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts))
    _call_int('bpf_map_update_batch', lib().bpf_map_update_batch, fd, keys, values, ctypes.byref(n), ctypes.byref(opts))
    return n.value


def map_lookup_batch(fd: int, in_batch: Any, out_batch: Any, keys: Any, values: Any, count: int) -> tuple[int, bool]:
    """One BPF_MAP_LOOKUP_BATCH step: (elements returned, whether the walk is complete)."""
    n = ctypes.c_uint32(count)
    opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts))
    ret = lib().bpf_map_lookup_batch(fd, in_batch, out_batch, keys, values, ctypes.byref(n), ctypes.byref(opts))
    if ret == -errno.ENOENT:
        return n.value, True
    if ret < 0:
        raise LibbpfError('bpf_map_lookup_batch', -ret)
    return n.value, False


def map_get_next_key(fd: int, key: Any, next_key: Any) -> bool:
    """Step a key walk; False at the end."""
    ret = lib().bpf_map_get_next_key(fd, key, next_key)
    if ret == -errno.ENOENT:
        return False
    if ret < 0:
        raise LibbpfError('bpf_map_get_next_key', -ret)
    return True


def prog_load(prog_type: int, name: str, insns: bytes, license: str = 'GPL') -> int:
    """Load a program from raw instructions (8 bytes each)."""
    return _call_int(
        f'bpf_prog_load({name})', lib().bpf_prog_load, prog_type, name.encode(), license.encode(), insns,
        len(insns) // 8, None,
    )  # fmt: skip


def prog_test_run(fd: int, data: bytes = b'', repeat: int = 1) -> int:
    """BPF_PROG_TEST_RUN: run the program `repeat` times; its return value."""
    buf = ctypes.create_string_buffer(data, len(data)) if data else None
    # repeat 0 means once; raw tracepoint programs refuse any other value.
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), repeat=repeat if repeat > 1 else 0)
    if buf is not None:
        opts.data_in = ctypes.addressof(buf)
        opts.data_size_in = len(data)
    _call_int('bpf_prog_test_run_opts', lib().bpf_prog_test_run_opts, fd, ctypes.byref(opts))
    return opts.retval


class Btf:
    """Read-only view of a BTF blob (the kernel's, or a BPF object's)."""

    def __init__(self, ptr: int, owned: bool):
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def load_vmlinux(cls) -> Btf:
        return cls(_call_ptr('btf__load_vmlinux_btf', lib().btf__load_vmlinux_btf), owned=True)

    @classmethod
    def parse(cls, path: str) -> Btf:
        return cls(_call_ptr(f'btf__parse({path})', lib().btf__parse, path.encode(), None), owned=True)

    def close(self) -> None:
        if self._owned and self._ptr:
            lib().btf__free(self._ptr)
        self._ptr = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, name: str, kind: int) -> int | None:
        """Type id of `name` of `kind`, or None."""
        type_id = lib().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return type_id if type_id > 0 else None

    def _type(self, type_id: int) -> _BtfType:
        ptr = lib().btf__type_by_id(self._ptr, type_id)
        if not ptr:
            raise LibbpfError(f'btf__type_by_id({type_id})', errno.ENOENT)
        return ptr.contents

    def _items(self, type_id: int, item: type[ctypes.Structure]) -> list[Any]:
        t = self._type(type_id)
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        return [item.from_address(base + i * ctypes.sizeof(item)) for i in range(vlen)]

    def kind(self, type_id: int) -> int:
        return (self._type(type_id).info >> 24) & 0x1F

    def name(self, type_id: int) -> str:
        return self._name(self._type(type_id).name_off)

    def _name(self, offset: int) -> str:
        name = lib().btf__name_by_offset(self._ptr, offset)
        return name.decode() if name else ''

    def skip_modifiers(self, type_id: int) -> int:
        """Follow typedefs, const, volatile... to the type they name."""
        while type_id and self.kind(type_id) in _BTF_MODIFIERS:
            type_id = self._type(type_id).size_or_type
        return type_id

    def size(self, type_id: int) -> int:
        size = lib().btf__resolve_size(self._ptr, type_id)
        if size < 0:
            raise LibbpfError(f'btf__resolve_size({type_id})', -size)
        return size

    def pointee(self, type_id: int) -> int:
        """The type a pointer (after modifiers) points to."""
        type_id = self.skip_modifiers(type_id)
        if self.kind(type_id) != BTF_KIND_PTR:
            raise LookupError(f'BTF type {type_id} is not a pointer')
        return self._type(type_id).size_or_type

    def array(self, type_id: int) -> tuple[int, int]:
        """(element type id, number of elements) of an array type."""
        type_id = self.skip_modifiers(type_id)
        if self.kind(type_id) != BTF_KIND_ARRAY:
            raise LookupError(f'BTF type {type_id} is not an array')
        t = self._type(type_id)
        arr = _BtfArray.from_address(ctypes.addressof(t) + ctypes.sizeof(_BtfType))
        return arr.type, arr.nelems

    def members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of each member of a struct or union."""
        type_id = self.skip_modifiers(type_id)
        t = self._type(type_id)
        kind_flag = t.info >> 31
        return [
            (self._name(m.name_off), m.type, (m.offset & 0xFFFFFF) if kind_flag else m.offset)
            for m in self._items(type_id, _BtfMember)
        ]

    def member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(byte offset, type id) of a member, looking into anonymous structs and unions."""
        for member_name, member_type, bit_offset in self.members(type_id):
            if member_name == name:
                return bit_offset // 8, member_type
            if not member_name and self.kind(self.skip_modifiers(member_type)) in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                inner = self.member(member_type, name)
                if inner is not None:
                    return bit_offset // 8 + inner[0], inner[1]
        return None

    def struct(self, name: str) -> int | None:
        return self.find(name, BTF_KIND_STRUCT)

    def enum_value(self, enum_name: str, value_name: str) -> int | None:
        for kind, item in ((BTF_KIND_ENUM, _BtfEnum), (BTF_KIND_ENUM64, _BtfEnum64)):
            type_id = self.find(enum_name, kind)
            if type_id is None:
                continue
            for e in self._items(type_id, item):
                if self._name(e.name_off) == value_name:
                    return e.val if item is _BtfEnum else (e.val_hi32 << 32) | e.val_lo32
        return None

    def func_proto_params(self, type_id: int) -> list[int]:
        """Parameter type ids of a function prototype (through typedefs and a pointer)."""
        type_id = self.skip_modifiers(type_id)
        if self.kind(type_id) == BTF_KIND_PTR:
            type_id = self.skip_modifiers(self._type(type_id).size_or_type)
        if self.kind(type_id) != BTF_KIND_FUNC_PROTO:
            raise LookupError(f'BTF type {type_id} is not a function prototype')
        return [p.type for p in self._items(type_id, _BtfParam)]

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of the variables in a data section (.rodata, .bss...)."""
        type_id = self.find(section, BTF_KIND_DATASEC)
        if type_id is None:
            return {}
        return {self.name(v.type): (v.offset, v.size) for v in self._items(type_id, _BtfVarSecinfo)}


class Link:
    """An attached program; destroy() detaches it."""

    def __init__(self, ptr: int, program: str):
        self._ptr = ptr
        self.program = program

    @property
    def fd(self) -> int:
        return lib().bpf_link__fd(self._ptr) if self._ptr else -1

    def destroy(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            lib().bpf_link__destroy(ptr)


class Map:
    """A map of an opened BPF object."""

    def __init__(self, ptr: int, name: str):
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self._ptr)

    def set_max_entries(self, n: int) -> None:
        _call_int(f'bpf_map__set_max_entries({self.name})', lib().bpf_map__set_max_entries, self._ptr, n)

    def set_type(self, map_type: int) -> None:
        _call_int(f'bpf_map__set_type({self.name})', lib().bpf_map__set_type, self._ptr, map_type)

    def set_key_size(self, size: int) -> None:
        _call_int(f'bpf_map__set_key_size({self.name})', lib().bpf_map__set_key_size, self._ptr, size)

    def set_value_size(self, size: int) -> None:
        _call_int(f'bpf_map__set_value_size({self.name})', lib().bpf_map__set_value_size, self._ptr, size)

    def initial_value(self) -> tuple[int, int]:
        """(address, size) of a global-data map's contents before load."""
        size = ctypes.c_size_t(0)
        ptr = _call_ptr(f'bpf_map__initial_value({self.name})', lib().bpf_map__initial_value, self._ptr, size)
        return ptr, size.value

    def lookup(self, key: bytes, value_size: int) -> bytes:
        value = ctypes.create_string_buffer(value_size)
        _call_int(f'bpf_map_lookup_elem({self.name})', lib().bpf_map_lookup_elem, self.fd, key, value)
        return value.raw


class BpfObject:
    """An opened (then loaded) BPF ELF object. close() frees it and everything it loaded."""

    def __init__(self, path: str, btf_custom_path: str | None = None):
        self.path = path
        opts = _BpfObjectOpenOpts(sz=ctypes.sizeof(_BpfObjectOpenOpts))
        if btf_custom_path:
            opts.btf_custom_path = btf_custom_path.encode()
        self._ptr = _call_ptr(
            f'bpf_object__open_file({os.path.basename(path)})', lib().bpf_object__open_file, path.encode(), opts
        )
        self._links: list[Link] = []

    def _program(self, name: str) -> int:
        return _call_ptr(
            f'bpf_object__find_program_by_name({name})',
            lib().bpf_object__find_program_by_name,
            self._ptr,
            name.encode(),
        )

    def map(self, name: str) -> Map:
        ptr = _call_ptr(
            f'bpf_object__find_map_by_name({name})', lib().bpf_object__find_map_by_name, self._ptr, name.encode()
        )
        return Map(ptr, name)

    def set_autoload(self, program: str, autoload: bool) -> None:
        _call_int(
            f'bpf_program__set_autoload({program})', lib().bpf_program__set_autoload, self._program(program), autoload
        )

    def program_fd(self, program: str) -> int:
        return _call_int(f'bpf_program__fd({program})', lib().bpf_program__fd, self._program(program))

    def btf(self) -> Btf:
        return Btf(_call_ptr('bpf_object__btf', lib().bpf_object__btf, self._ptr), owned=False)

    def set_rodata(self, values: dict[str, bytes]) -> None:
        """Set `const volatile` globals before load, by name (as a skeleton would)."""
        variables = self.btf().datasec_vars('.rodata')
        address, size = self.map('.rodata').initial_value()
        for name, value in values.items():
            if name not in variables:
                raise KeyError(f'{name} is not a .rodata variable of {os.path.basename(self.path)}')
            offset, var_size = variables[name]
            if len(value) != var_size or offset + var_size > size:
                raise ValueError(f'{name} is {var_size} bytes, got {len(value)}')
            ctypes.memmove(address + offset, value, var_size)

    def load(self) -> None:
        _call_int(f'bpf_object__load({os.path.basename(self.path)})', lib().bpf_object__load, self._ptr)

    def reuse_map_fd(self, name: str, fd: int) -> None:
        """Make the object use an existing map instead of creating its own (before load)."""
        _call_int(f'bpf_map__reuse_fd({name})', lib().bpf_map__reuse_fd, self.map(name)._ptr, fd)

    def attach_iter(self, program: str) -> Link:
        ptr = _call_ptr(
            f'bpf_program__attach_iter({program})', lib().bpf_program__attach_iter, self._program(program), None
        )
        link = Link(ptr, program)
        self._links.append(link)
        return link

    def attach(self, program: str) -> Link:
        ptr = _call_ptr(f'bpf_program__attach({program})', lib().bpf_program__attach, self._program(program))
        link = Link(ptr, program)
        self._links.append(link)
        return link

    def close(self) -> None:
        """Detach every link, then free the object with its programs and maps; idempotent."""
        links, self._links = self._links, []
        for link in links:
            link.destroy()
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            lib().bpf_object__close(ptr)


class RingBuffer:
    """Consumer of a BPF ring buffer map; consume() hands every pending record to the callback."""

    def __init__(self, map_fd: int, callback: RingBufferCallback):
        def sample(_ctx: int, data: int, size: int) -> int:
            callback(ctypes.string_at(data, size))
            return 0

        self._sample = _RING_BUFFER_SAMPLE_FN(sample)  # kept alive as long as libbpf may call it
        self._ptr = _call_ptr('ring_buffer__new', lib().ring_buffer__new, map_fd, self._sample, None, None)

    def consume(self) -> int:
        return _call_int('ring_buffer__consume', lib().ring_buffer__consume, self._ptr)

    def free(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            lib().ring_buffer__free(ptr)


class PerfBuffer:
    """Consumer of a perf event array (kernels without ring buffers); counts lost records."""

    def __init__(self, map_fd: int, page_count: int, callback: RingBufferCallback):
        self.lost = 0

        def sample(_ctx: int, _cpu: int, data: int, size: int) -> None:
            callback(ctypes.string_at(data, size))

        def lost(_ctx: int, _cpu: int, count: int) -> None:
            self.lost += count

        self._sample = _PERF_BUFFER_SAMPLE_FN(sample)
        self._lost = _PERF_BUFFER_LOST_FN(lost)
        self._ptr = _call_ptr(
            'perf_buffer__new', lib().perf_buffer__new, map_fd, page_count, self._sample, self._lost, None, None
        )

    def consume(self) -> int:
        return _call_int('perf_buffer__consume', lib().perf_buffer__consume, self._ptr)

    def free(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            lib().perf_buffer__free(ptr)
