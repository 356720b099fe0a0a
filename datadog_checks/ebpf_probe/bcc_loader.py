# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The thin BCC layer: compile kernel-side C at run time, attach it, read its buffers.

BCC is imported only when this path is taken: it is the fallback when the
CO-RE object cannot be loaded, and it costs ~100 MB of memory (clang/LLVM).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import kernel, libbpf


class BccError(RuntimeError):
    """BCC is missing, or compiling, loading or attaching with it failed."""


def import_bcc() -> Any:
    try:
        import bcc  # noqa: PLC0415  (heavy and optional: imported only on this path)
    except ImportError as e:
        raise BccError(
            f"BCC's Python module is not importable ({e}): install python3-bpfcc (Debian/Ubuntu) or "
            'python3-bcc (RHEL) and run the check with a Python that sees it'
        ) from None
    return bcc


def find_kernel_headers(release: str | None = None) -> str | None:
    """Where BCC will find this kernel's headers, or None."""
    release = release or kernel.kernel_release()
    env = os.environ.get('BCC_KERNEL_SOURCE')
    candidates = [env] if env else []
    candidates += [f'/lib/modules/{release}/build', f'/lib/modules/{release}/source', '/sys/kernel/kheaders.tar.xz']
    for path in candidates:
        if path and os.path.exists(path):
            return path
    return None


def check_kernel_headers() -> str:
    path = find_kernel_headers()
    if path is None:
        release = kernel.kernel_release()
        raise BccError(
            f'no kernel headers for {release}, which BCC compiles against: install linux-headers-{release} '
            '(Debian/Ubuntu) or kernel-devel (RHEL), or point BCC_KERNEL_SOURCE at them'
        )
    return path


def _offset(btf: libbpf.Btf, struct_name: str, path: str) -> tuple[int, int]:
    """(byte offset, type id) of a dotted member path inside a struct, from BTF."""
    type_id = btf.struct(struct_name)
    if type_id is None:
        raise LookupError(f'struct {struct_name}')
    total = 0
    for part in path.split('.'):
        member = btf.member(type_id, part)
        if member is None:
            raise LookupError(f'{struct_name}.{path}')
        total += member[0]
        type_id = member[1]
    return total, type_id


# macro -> (struct, member path), several paths for fields renamed across kernels
_BTF_OFFSETS: dict[str, tuple[str, tuple[str, ...]]] = {
    'OFF_TASK_PID': ('task_struct', ('pid',)),
    'OFF_TASK_TGID': ('task_struct', ('tgid',)),
    'OFF_TASK_COMM': ('task_struct', ('comm',)),
    'OFF_TASK_MM': ('task_struct', ('mm',)),
    'OFF_TASK_SIGNAL': ('task_struct', ('signal',)),
    'OFF_TASK_REAL_CRED': ('task_struct', ('real_cred',)),
    'OFF_TASK_CGROUPS': ('task_struct', ('cgroups',)),
    'OFF_SIGNAL_OOM_SCORE_ADJ': ('signal_struct', ('oom_score_adj',)),
    'OFF_SIGNAL_PENDING': ('signal_struct', ('shared_pending.signal',)),
    'OFF_CRED_UID': ('cred', ('uid',)),
    'OFF_MM_TOTAL_VM': ('mm_struct', ('total_vm',)),
    'OFF_MM_PGTABLES': ('mm_struct', ('pgtables_bytes',)),
    'OFF_MM_RSS_STAT': ('mm_struct', ('rss_stat',)),
    'OFF_CSS_SET_SUBSYS': ('css_set', ('subsys',)),
    'OFF_CSS_CGROUP': ('cgroup_subsys_state', ('cgroup',)),
    'OFF_CGROUP_KN': ('cgroup', ('kn',)),
    'OFF_KN_PARENT': ('kernfs_node', ('__parent', 'parent')),
    'OFF_KN_NAME': ('kernfs_node', ('name',)),
    'OFF_KN_ID': ('kernfs_node', ('id',)),
    'OFF_OC_MEMCG': ('oom_control', ('memcg',)),
    'OFF_OC_TOTALPAGES': ('oom_control', ('totalpages',)),
    'OFF_OC_CHOSEN': ('oom_control', ('chosen',)),
    'OFF_OC_CHOSEN_POINTS': ('oom_control', ('chosen_points',)),
}


def bcc_offsets(btf: libbpf.Btf | None) -> dict[str, str]:
    """Macros giving the BCC variant the kernel's struct layout: from BTF, else from the kernel headers."""
    if btf is None:
        return {'OFFSETS_FROM_HEADERS': '1'}
    defines: dict[str, str] = {}
    missing = []
    for macro, (struct_name, paths) in _BTF_OFFSETS.items():
        for path in paths:
            try:
                defines[macro] = str(_offset(btf, struct_name, path)[0])
                break
            except LookupError:
                continue
        else:
            missing.append(f'{struct_name}.{paths[0]}')
    if missing:
        raise BccError(f'the kernel BTF lacks fields the probe reads: {", ".join(missing)}')
    # mm->rss_stat: percpu_counter[] since 6.2, struct mm_rss_stat { atomic_long_t count[]; } before.
    _, rss_type = _offset(btf, 'mm_struct', 'rss_stat')
    rss_type = btf.skip_modifiers(rss_type)
    if btf.kind(rss_type) == libbpf.BTF_KIND_ARRAY:
        element, _ = btf.array(rss_type)
        counter = btf.member(element, 'count')
        if counter is None:
            raise BccError('the kernel BTF has an unknown mm_struct.rss_stat layout')
        defines['RSS_STAT_STRIDE'] = str(btf.size(element))
        defines['OFF_RSS_COUNT'] = str(counter[0])
    else:
        count_offset, count_type = _offset(btf, 'mm_rss_stat', 'count')
        element, _ = btf.array(count_type)
        defines['RSS_STAT_STRIDE'] = str(btf.size(element))
        defines['OFF_RSS_COUNT'] = str(count_offset)
    memory_id = btf.enum_value('cgroup_subsys_id', 'memory_cgrp_id')
    defines['MEMORY_CGRP_ID'] = str(memory_id if memory_id is not None else -1)
    return defines


_STDERR_LOCK = threading.Lock()


@contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what BCC's C++ side writes to fd 2 (clang diagnostics, the verifier log)."""
    captured: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.extend(tmp.read().decode('utf-8', 'replace').splitlines())


def _summary(lines: list[str], limit: int = 6) -> str:
    useful = [line.strip() for line in lines if 'error' in line.lower() or 'invalid' in line.lower()]
    return ' | '.join((useful or [line.strip() for line in lines if line.strip()])[-limit:])


class BccProgram:
    """A BCC module compiled from a source file with -D macros; close() frees all of it."""

    def __init__(self, bpf: Any, bcc: Any):
        self._bpf = bpf
        self._bcc = bcc
        self._is_ring = False
        self.lost = 0

    @classmethod
    def compile(cls, source: Path, defines: dict[str, str]) -> BccProgram:
        bcc = import_bcc()
        check_kernel_headers()
        try:
            text = source.read_text()
        except OSError as e:
            raise BccError(f'cannot read the BCC source {source}: {e}') from None
        cflags = [f'-D{name}={value}' for name, value in sorted(defines.items())]
        cflags += [f'-I{source.parent}', '-Wno-unused-function']
        error: Exception | None
        with _captured_stderr() as output:
            try:
                bpf = bcc.BPF(text=text.encode(), cflags=cflags)
            except Exception as e:  # BCC raises bare Exception for compile and load errors
                error = e
            else:
                error = None
        if error is not None:
            details = _summary(output)
            raise BccError(f'{error}'.split('\n')[0] + (f': {details}' if details else '')) from None
        return cls(bpf, bcc)

    def attach_raw_tracepoint(self, tracepoint: str, function: str) -> None:
        self._attach(
            'raw tracepoint ' + tracepoint,
            self._bpf.attach_raw_tracepoint,
            tp=tracepoint.encode(),
            fn_name=function.encode(),
        )

    def attach_kprobe(self, event: str, function: str) -> None:
        self._attach('kprobe ' + event, self._bpf.attach_kprobe, event=event.encode(), fn_name=function.encode())

    def _attach(self, what: str, attach: Callable[..., Any], **kwargs: bytes) -> None:
        error: Exception | None
        with _captured_stderr() as output:
            try:
                attach(**kwargs)
            except Exception as e:  # BCC raises bare Exception
                error = e
            else:
                error = None
        if error is not None:
            details = _summary(output)
            raise BccError(f'attaching the {what} failed: {error}' + (f' ({details})' if details else '')) from None

    def open_events(self, table: str, callback: Callable[[bytes], None]) -> None:
        """Route the records of a ring buffer or perf buffer table to callback(bytes)."""
        events = self._bpf[table.encode()]

        def on_sample(*args: Any) -> None:
            data, size = args[-2], args[-1]  # (ctx, data, size) or (cpu, data, size)
            callback(ctypes.string_at(data, size))

        def on_lost(count: int) -> None:
            self.lost += count

        if isinstance(events, self._bcc.table.RingBuf):
            self._is_ring = True
            events.open_ring_buffer(on_sample)
        else:
            events.open_perf_buffer(on_sample, page_cnt=64, lost_cb=on_lost)

    def consume(self) -> None:
        if self._is_ring:
            self._bpf.ring_buffer_consume()
        else:
            self._bpf.perf_buffer_poll(timeout=0)

    def array_u64(self, table: str, index: int = 0) -> int:
        return int(self._bpf[table.encode()][ctypes.c_int(index)].value)

    def close(self) -> None:
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()
