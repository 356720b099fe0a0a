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

from datadog_checks.ebpf_probe.resources import PACKAGE_DIR

from . import uapi

LIBBPF_SONAME = 'libbpf.so.1'
# Built into the package by `make bundle` (libbpf 1.5.0, libelf and zlib linked in): a known
# version, the one the structures below are tested against, on hosts that have no libbpf at all.
BUNDLED_LIBBPF = PACKAGE_DIR / 'data' / 'lib' / LIBBPF_SONAME


def library_candidates() -> list[str]:
    """What to load, in order: the bundled libbpf when present, then the host's by soname."""
    bundled = [str(BUNDLED_LIBBPF)] if BUNDLED_LIBBPF.is_file() else []
    return bundled + [LIBBPF_SONAME]


# enum libbpf_print_level
LIBBPF_DEBUG = 2

# How many of libbpf's last lines an error keeps, and the longest message read whole.
_LOG_LINES_KEPT = 40
_MESSAGE_MAX = 1 << 18


ENOTSUPP = 524
LIBBPF_ERRNO_BASE = 4000  # enum libbpf_errno


class LibbpfError(OSError):
    """A libbpf call failed. `errno` is set; `log` holds libbpf's messages during the call."""

    def __init__(self, call: str, err: int, log: list[str] | None = None):
        self.call = call
        self.log = list(log or [])
        # 524 is the kernel's own ENOTSUPP, which libc does not name; 4000 and up are libbpf's own.
        if err == ENOTSUPP:
            reason = 'Operation not supported by this kernel'
        elif err >= LIBBPF_ERRNO_BASE:
            buf = ctypes.create_string_buffer(128)
            lib().libbpf_strerror(err, buf, len(buf))
            reason = buf.value.decode('utf-8', 'replace')
        else:
            reason = os.strerror(err)
        message = f'{call} failed: {reason} (errno {err})'
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


class _IterAttachOpts(ctypes.Structure):
    # struct bpf_iter_attach_opts; link_info points at union bpf_iter_link_info (map_fd first).
    _fields_ = [('sz', ctypes.c_size_t), ('link_info', ctypes.c_void_p), ('link_info_len', ctypes.c_uint32)]


class MapBatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf's bpf.h), for the batch calls here and in the tests."""

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


RecordCallback = Callable[[bytes], None]
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
    'libbpf_strerror': (_I, [_I, _S, ctypes.c_size_t]),
    'bpf_object__open_file': (_P, [_S, ctypes.POINTER(_BpfObjectOpenOpts)]),
    'bpf_object__load': (_I, [_P]),
    'bpf_object__close': (None, [_P]),
    'bpf_object__btf': (_P, [_P]),
    'bpf_object__find_program_by_name': (_P, [_P, _S]),
    'bpf_object__find_map_by_name': (_P, [_P, _S]),
    'bpf_program__set_autoload': (_I, [_P, ctypes.c_bool]),
    'bpf_program__attach': (_P, [_P]),
    'bpf_program__attach_iter': (_P, [_P, _P]),
    'bpf_program__fd': (_I, [_P]),
    'bpf_link__destroy': (_I, [_P]),
    'bpf_link__fd': (_I, [_P]),
    'bpf_map__fd': (_I, [_P]),
    'bpf_map__set_type': (_I, [_P, _I]),
    'bpf_map__set_max_entries': (_I, [_P, _U32]),
    'bpf_map__set_key_size': (_I, [_P, _U32]),
    'bpf_map__set_value_size': (_I, [_P, _U32]),
    'bpf_map__initial_value': (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    'bpf_map__reuse_fd': (_I, [_P, _I]),
    'btf__parse': (_P, [_S, _P]),
    'btf__load_from_kernel_by_id': (_P, [_U32]),
    'btf__free': (None, [_P]),
    'btf__find_by_name_kind': (ctypes.c_int32, [_P, _S, _U32]),
    'btf__type_by_id': (_P, [_P, _U32]),
    'btf__name_by_offset': (_S, [_P, _U32]),
    'btf__resolve_size': (ctypes.c_int64, [_P, _U32]),
    'ring_buffer__new': (_P, [_I, _RING_BUFFER_SAMPLE_FN, _P, _P]),
    'ring_buffer__consume': (_I, [_P]),
    'ring_buffer__free': (None, [_P]),
    'perf_buffer__new': (_P, [_I, ctypes.c_size_t, _PERF_BUFFER_SAMPLE_FN, _PERF_BUFFER_LOST_FN, _P, _P]),
    'perf_buffer__consume': (_I, [_P]),
    'perf_buffer__free': (None, [_P]),
    'libbpf_bpf_prog_type_str': (_S, [_I]),
    'libbpf_bpf_map_type_str': (_S, [_I]),
    'libbpf_bpf_attach_type_str': (_S, [_I]),
    'btf__load_from_kernel_by_id_split': (_P, [_U32, _P]),
    'bpf_xdp_query_id': (_I, [_I, _I, ctypes.POINTER(_U32)]),
    'bpf_prog_query_opts': (_I, [_I, _I, _P]),
    'bpf_iter_create': (_I, [_I]),
    'bpf_prog_get_next_id': (_I, [_U32, ctypes.POINTER(_U32)]),
    'bpf_map_get_next_id': (_I, [_U32, ctypes.POINTER(_U32)]),
    'bpf_prog_get_fd_by_id': (_I, [_U32]),
    'bpf_map_get_fd_by_id': (_I, [_U32]),
    'bpf_link_get_next_id': (_I, [_U32, ctypes.POINTER(_U32)]),
    'bpf_link_get_fd_by_id': (_I, [_U32]),
    'bpf_btf_get_fd_by_id': (_I, [_U32]),
    'bpf_obj_get_info_by_fd': (_I, [_I, _P, ctypes.POINTER(_U32)]),
    'bpf_obj_get': (_I, [_S]),
    'bpf_enable_stats': (_I, [_I]),
    'bpf_map_lookup_elem': (_I, [_I, _P, _P]),
    'bpf_map_update_elem': (_I, [_I, _P, _P, ctypes.c_uint64]),
    'bpf_map_lookup_batch': (_I, [_I, _P, _P, _P, _P, ctypes.POINTER(_U32), _P]),
    'bpf_map_get_next_key': (_I, [_I, _P, _P]),
    'bpf_prog_test_run_opts': (_I, [_I, _P]),
}


class LibbpfUnavailable(RuntimeError):
    """Neither the bundled libbpf nor the host's libbpf.so.1 can be loaded."""


class _Libbpf:
    """libbpf, loaded on first use, with the print callback installed once."""

    def __init__(self) -> None:
        self._lib: ctypes.CDLL | None = None
        self._lock = threading.Lock()
        self._print_fn = _PRINT_FN(self._on_print)
        self._previous_print: Any = None  # whoever printed libbpf's messages before us, in this process
        self._libc = ctypes.CDLL(None, use_errno=True)  # libc, already loaded: no ldconfig run
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def _on_print(self, level: int, fmt: bytes, va_list: int) -> int:
        # The va_list arrives as a pointer on x86-64 and arm64; vsnprintf formats it. libbpf's
        # debug lines (hundreds per load) are formatted only when someone wants them.
        lines = _log.lines
        if lines is None and self._previous_print is not None:
            # Not a call of ours (another user of this libbpf, in another thread): theirs to print.
            return self._previous_print(level, fmt, va_list)
        if level == LIBBPF_DEBUG and not _debug_log.isEnabledFor(logging.DEBUG):
            return 0
        if lines is not None:
            # One message may be a whole verifier log, whose end says why: room for it (a va_list
            # is read once, so the buffer cannot be sized by a first call).
            buf = ctypes.create_string_buffer(_MESSAGE_MAX)
            self._libc.vsnprintf(buf, len(buf), fmt, va_list)
            lines.extend(buf.value.decode('utf-8', 'replace').splitlines())
            del lines[:-_LOG_LINES_KEPT]
        return 0

    def get(self) -> ctypes.CDLL:
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    lib = _load_first(library_candidates())
                    for name, (restype, argtypes) in _SIGNATURES.items():
                        func = getattr(lib, name)
                        func.restype = restype
                        func.argtypes = argtypes
                    previous = lib.libbpf_set_print(self._print_fn)
                    if previous:
                        self._previous_print = _PRINT_FN(previous)
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


_LIBBPF = _Libbpf()


def lib() -> ctypes.CDLL:
    return _LIBBPF.get()


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


def call_ptr(call: str, func: Any, *args: Any) -> int:
    """Call a libbpf function returning a pointer: NULL means failure, errno says why."""
    with capture_log() as log:
        ctypes.set_errno(0)
        ptr = func(*args)
        if not ptr:
            raise LibbpfError(call, ctypes.get_errno() or errno.EINVAL, log)
    return ptr


def call_int(call: str, func: Any, *args: Any) -> int:
    """Call a libbpf function returning an int: a negative value is -errno."""
    with capture_log() as log:
        ret = func(*args)
        if ret < 0:
            raise LibbpfError(call, -ret, log)
    return ret


# --- Objects already in the kernel: enumerate, open by id, describe ------------

_NEXT_ID = {'prog': 'bpf_prog_get_next_id', 'map': 'bpf_map_get_next_id', 'link': 'bpf_link_get_next_id'}
_FD_BY_ID = {
    'prog': 'bpf_prog_get_fd_by_id',
    'map': 'bpf_map_get_fd_by_id',
    'link': 'bpf_link_get_fd_by_id',
}


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


def object_info(fd: int, info: ctypes.Structure) -> int:
    """Fill info; returns how many bytes of it the kernel knows (an older kernel's struct is shorter)."""
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        raise LibbpfError('bpf_obj_get_info_by_fd', -ret)
    return size.value


def prog_info(fd: int) -> uapi.BpfProgInfo:
    info = uapi.BpfProgInfo()
    info.filled = object_info(fd, info)
    return info


def prog_map_ids(fd: int, count: int) -> list[int]:
    """Ids of the maps a program uses (count from a first prog_info())."""
    if count <= 0:
        return []
    ids = (ctypes.c_uint32 * count)()
    info = uapi.BpfProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    object_info(fd, info)
    return list(ids[: min(count, info.nr_map_ids)])


def map_info(fd: int) -> uapi.BpfMapInfo:
    info = uapi.BpfMapInfo()
    object_info(fd, info)
    return info


def link_info(
    fd: int, buffer_at: int | None = None, size_at: int | None = None, buffer_size: int = 512, count: int | None = None
) -> tuple[bytes, bytes]:
    """A link's bpf_link_info as bytes, and what the kernel wrote in the buffer given (b'' without one).

    buffer_at, size_at: the offsets in the structure of a buffer's address and of its size (8 bytes
    further by default: its size in bytes, or `count` for a list), filled in first, for the link
    types that return a name or a list there (perf_event links fail or stay silent without one).
    """
    info = uapi.BpfLinkInfo()
    if buffer_at is None:
        object_info(fd, info)
        return bytes(info), b''
    buffer = ctypes.create_string_buffer(buffer_size)
    raw = (ctypes.c_uint8 * ctypes.sizeof(info)).from_buffer(info)
    ctypes.c_uint64.from_buffer(raw, buffer_at).value = ctypes.addressof(buffer)
    ctypes.c_uint32.from_buffer(raw, buffer_at + 8 if size_at is None else size_at).value = (
        buffer_size if count is None else count
    )
    object_info(fd, info)
    return bytes(info), buffer.raw


class _ProgQueryOpts(ctypes.Structure):
    # struct bpf_prog_query_opts, up to the count (libbpf 1.0+)
    _fields_ = [
        ('sz', ctypes.c_size_t),
        ('query_flags', _U32),
        ('attach_flags', _U32),
        ('prog_ids', ctypes.POINTER(_U32)),
        ('count', _U32),
    ]


def attached_programs(target_fd_or_ifindex: int, attach_type: int) -> set[int] | None:
    """Ids of the programs attached to a target (an interface's index for tcx and netkit) in this
    process's network namespace; None where the kernel cannot say."""
    ids = (_U32 * 64)()
    opts = _ProgQueryOpts(sz=ctypes.sizeof(_ProgQueryOpts), prog_ids=ids, count=64)
    if lib().bpf_prog_query_opts(target_fd_or_ifindex, attach_type, ctypes.byref(opts)) < 0:
        return None
    return set(ids[: min(opts.count, 64)])


def xdp_program(ifindex: int) -> int | None:
    """The id of the XDP program on an interface of this process's network namespace (0: none);
    None where there is no such interface."""
    prog_id = _U32(0)
    return prog_id.value if lib().bpf_xdp_query_id(ifindex, 0, ctypes.byref(prog_id)) == 0 else None


def prog_type_name(prog_type: int) -> str:
    name = lib().libbpf_bpf_prog_type_str(prog_type)
    return name.decode() if name else f'type_{prog_type}'


def attach_type_name(attach_type: int) -> str:
    name = lib().libbpf_bpf_attach_type_str(attach_type)
    return name.decode() if name else f'type_{attach_type}'


def map_type_name(map_type: int) -> str:
    name = lib().libbpf_bpf_map_type_str(map_type)
    return name.decode() if name else f'type_{map_type}'


def obj_get(path: str) -> int:
    """An fd for a pinned object."""
    return call_int(f'bpf_obj_get({path})', lib().bpf_obj_get, path.encode())


def enable_stats(stats_type: int = uapi.BPF_STATS_RUN_TIME) -> int:
    """BPF_ENABLE_STATS: stats stay on while the returned fd is open (close it to turn them off)."""
    return call_int('bpf_enable_stats', lib().bpf_enable_stats, stats_type)


def read_iterator(link: Link, chunk: int = 65536) -> bytes:
    """Run a BPF iterator once: everything its program wrote for this pass."""
    fd = call_int(f'bpf_iter_create({link.program})', lib().bpf_iter_create, link.fd)
    try:
        parts: list[bytes] = []
        while True:
            try:
                data = os.read(fd, chunk)
            except BlockingIOError:
                # EAGAIN: the kernel visited a million objects (MAX_ITER_OBJECTS) without the program
                # writing anything, and paused; the next read goes on from where it stopped.
                continue
            if not data:
                return b''.join(parts)
            parts.append(data)
    finally:
        os.close(fd)


# --- Map elements and test runs (entry counting) --------------------------------


def map_lookup_elem(fd: int, key: bytes, value_size: int) -> bytes:
    value = ctypes.create_string_buffer(value_size)
    call_int('bpf_map_lookup_elem', lib().bpf_map_lookup_elem, fd, key, value)
    return value.raw


def map_update_elem(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    call_int('bpf_map_update_elem', lib().bpf_map_update_elem, fd, key, value, flags)


def map_lookup_batch(fd: int, in_batch: Any, out_batch: Any, keys: Any, values: Any, count: int) -> tuple[int, bool]:
    """One BPF_MAP_LOOKUP_BATCH step: (elements returned, whether the walk is complete)."""
    n = ctypes.c_uint32(count)
    opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts))
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


def prog_test_run(fd: int, data: bytes = b'', repeat: int = 1) -> int:
    """BPF_PROG_TEST_RUN: run the program `repeat` times; its return value."""
    return prog_test_run_result(fd, data, repeat).retval


def prog_test_run_result(fd: int, data: bytes = b'', repeat: int = 1) -> _TestRunOpts:
    """BPF_PROG_TEST_RUN: what the kernel says of the runs (retval, duration: average ns per run)."""
    buf = ctypes.create_string_buffer(data, len(data)) if data else None
    # repeat 0 means once; raw tracepoint programs refuse any other value.
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), repeat=repeat if repeat > 1 else 0)
    if buf is not None:
        opts.data_in = ctypes.addressof(buf)
        opts.data_size_in = len(data)
    call_int('bpf_prog_test_run_opts', lib().bpf_prog_test_run_opts, fd, ctypes.byref(opts))
    return opts


# --- BPF objects (ELF files) we load ---------------------------------------------


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

    def _set(self, what: str, value: int) -> None:
        call_int(f'bpf_map__set_{what}({self.name})', getattr(lib(), f'bpf_map__set_{what}'), self._ptr, value)

    def set_max_entries(self, n: int) -> None:
        self._set('max_entries', n)

    def set_type(self, map_type: int) -> None:
        self._set('type', map_type)

    def set_key_size(self, size: int) -> None:
        self._set('key_size', size)

    def set_value_size(self, size: int) -> None:
        self._set('value_size', size)

    def reuse_fd(self, fd: int) -> None:
        """Use an existing map instead of creating this one (before load)."""
        call_int(f'bpf_map__reuse_fd({self.name})', lib().bpf_map__reuse_fd, self._ptr, fd)

    def initial_value(self) -> tuple[int, int]:
        """(address, size) of a global-data map's contents before load."""
        size = ctypes.c_size_t(0)
        ptr = call_ptr(f'bpf_map__initial_value({self.name})', lib().bpf_map__initial_value, self._ptr, size)
        return ptr, size.value

    def lookup(self, key: bytes, value_size: int) -> bytes:
        return map_lookup_elem(self.fd, key, value_size)


class BpfObject:
    """An opened (then loaded) BPF ELF object. close() frees it and everything it loaded."""

    def __init__(self, path: str, btf_custom_path: str | None = None):
        self.path = path
        opts = _BpfObjectOpenOpts(sz=ctypes.sizeof(_BpfObjectOpenOpts))
        if btf_custom_path:
            opts.btf_custom_path = btf_custom_path.encode()
        self._ptr = call_ptr(
            f'bpf_object__open_file({os.path.basename(path)})', lib().bpf_object__open_file, path.encode(), opts
        )
        self._links: list[Link] = []

    @property
    def pointer(self) -> int:
        """The struct bpf_object * (for the btf module)."""
        return self._ptr

    def _program(self, name: str) -> int:
        return call_ptr(
            f'bpf_object__find_program_by_name({name})',
            lib().bpf_object__find_program_by_name,
            self._ptr,
            name.encode(),
        )

    def map(self, name: str) -> Map:
        ptr = call_ptr(
            f'bpf_object__find_map_by_name({name})', lib().bpf_object__find_map_by_name, self._ptr, name.encode()
        )
        return Map(ptr, name)

    def set_autoload(self, program: str, autoload: bool) -> None:
        call_int(
            f'bpf_program__set_autoload({program})', lib().bpf_program__set_autoload, self._program(program), autoload
        )

    def program_fd(self, program: str) -> int:
        return call_int(f'bpf_program__fd({program})', lib().bpf_program__fd, self._program(program))

    def load(self) -> None:
        call_int(f'bpf_object__load({os.path.basename(self.path)})', lib().bpf_object__load, self._ptr)

    def _attached(self, call: str, func: Any, program: str, *args: Any) -> Link:
        link = Link(call_ptr(f'{call}({program})', func, self._program(program), *args), program)
        self._links.append(link)
        return link

    def attach(self, program: str) -> Link:
        return self._attached('bpf_program__attach', lib().bpf_program__attach, program)

    def attach_iter(self, program: str) -> Link:
        return self._attached('bpf_program__attach_iter', lib().bpf_program__attach_iter, program, None)

    def read_map_iterator(self, program: str, map_fd: int) -> bytes:
        """Run an iter/bpf_map_elem program over one map: attach it to the map, read, detach."""
        map_info = ctypes.c_uint32(map_fd)  # union bpf_iter_link_info: { struct { __u32 map_fd; } map; ... }
        opts = _IterAttachOpts(sz=ctypes.sizeof(_IterAttachOpts), link_info=ctypes.addressof(map_info), link_info_len=4)
        ptr = call_ptr(
            f'bpf_program__attach_iter({program})',
            lib().bpf_program__attach_iter,
            self._program(program),
            ctypes.byref(opts),
        )
        link = Link(ptr, program)
        try:
            return read_iterator(link)
        finally:
            link.destroy()

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

    def __init__(self, map_fd: int, callback: RecordCallback):
        def sample(_ctx: int, data: int, size: int) -> int:
            callback(ctypes.string_at(data, size))
            return 0

        self._sample = _RING_BUFFER_SAMPLE_FN(sample)  # kept alive as long as libbpf may call it
        self._ptr = call_ptr('ring_buffer__new', lib().ring_buffer__new, map_fd, self._sample, None, None)

    def consume(self) -> int:
        return call_int('ring_buffer__consume', lib().ring_buffer__consume, self._ptr)

    def free(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            lib().ring_buffer__free(ptr)


class PerfBuffer:
    """Consumer of a perf event array (kernels without ring buffers). The BPF side counts the
    records it could not write, so the kernel's count of lost samples is not asked for."""

    def __init__(self, map_fd: int, page_count: int, callback: RecordCallback):
        def sample(_ctx: int, _cpu: int, data: int, size: int) -> None:
            callback(ctypes.string_at(data, size))

        self._sample = _PERF_BUFFER_SAMPLE_FN(sample)
        no_lost_callback = _PERF_BUFFER_LOST_FN()  # NULL
        self._ptr = call_ptr(
            'perf_buffer__new', lib().perf_buffer__new, map_fd, page_count, self._sample, no_lost_callback, None, None
        )

    def consume(self) -> int:
        return call_int('perf_buffer__consume', lib().perf_buffer__consume, self._ptr)

    def free(self) -> None:
        if self._ptr:
            ptr, self._ptr = self._ptr, 0
            lib().perf_buffer__free(ptr)
