# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The thin BCC layer: compile kernel-side C at run time, attach it, read its buffers.

BCC is imported only when this path is taken: it is the fallback when the
CO-RE object cannot be loaded, and it costs ~100 MB of memory (clang/LLVM).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .requirements import kernel_release


class BccError(RuntimeError):
    """BCC is missing, or compiling, loading or attaching with it failed."""


# Where the packages put BCC's Python module, and what to install.
DEBIAN_BCC_MODULE = '/usr/lib/python3/dist-packages/bcc'
BCC_PACKAGES = 'python3-bpfcc (Debian, Ubuntu) or python3-bcc (RHEL, Fedora)'


def import_bcc(module_path: str | None = None) -> Any:
    """BCC's Python module: the `bcc` package in module_path when given, else whichever this Python sees.

    BCC's module is pure Python over libbcc.so, so the Agent's embedded Python can use the one a
    distribution package installed for the system's Python: module_path imports that package only
    (never the rest of its dist-packages folder, which would shadow the Agent's own packages).
    """
    if module_path:
        return _import_bcc_from(module_path)
    try:
        import bcc  # noqa: PLC0415  (heavy and optional: imported only on this path)
    except ImportError as e:
        raise BccError(
            f"BCC's Python module is not importable ({e}): install {BCC_PACKAGES}, and if this Python "
            f"({sys.executable}, like the Agent's embedded one) does not see it, set `bcc_module_path` to the "
            f'folder of its `bcc` package ({DEBIAN_BCC_MODULE} on Debian and Ubuntu)'
        ) from None
    except OSError as e:  # the module is there, libbcc.so is not
        raise BccError(f"BCC's Python module does not load ({e}): install {BCC_PACKAGES}") from None
    return bcc


def _import_bcc_from(module_path: str) -> Any:
    folder = Path(module_path)
    if not (folder / '__init__.py').is_file() and (folder / 'bcc' / '__init__.py').is_file():
        folder = folder / 'bcc'  # the folder that holds the package
    init = folder / '__init__.py'
    if not init.is_file():
        raise BccError(
            f"BCC's Python module is not in bcc_module_path {module_path} (no bcc/__init__.py there): install "
            f'{BCC_PACKAGES} and set `bcc_module_path` to the folder of its `bcc` package ({DEBIAN_BCC_MODULE} '
            'on Debian and Ubuntu)'
        )
    loaded = sys.modules.get('bcc')
    if loaded is not None:
        loaded_from = Path(getattr(loaded, '__file__', '') or '.').resolve().parent
        if loaded_from != folder.resolve():
            raise BccError(
                f'bcc is already imported from {loaded_from} in this process; bcc_module_path {module_path} '
                'cannot replace it: give every instance the same bcc_module_path'
            )
        return loaded
    spec = importlib.util.spec_from_file_location('bcc', init, submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise BccError(f"cannot import BCC's Python module from {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules['bcc'] = module  # its submodules import each other as bcc.*
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        for name in [name for name in sys.modules if name == 'bcc' or name.startswith('bcc.')]:
            del sys.modules[name]
        hint = f': install {BCC_PACKAGES} (its libbcc.so)' if isinstance(e, OSError) else ''
        raise BccError(
            f"BCC's Python module in {folder} does not load with this Python "
            f'({sys.version.split()[0]}): {type(e).__name__}: {e}{hint}'
        ) from None
    return module


def find_kernel_headers(release: str | None = None) -> str | None:
    """Where BCC will find this kernel's headers, or None."""
    release = release or kernel_release()
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
        release = kernel_release()
        raise BccError(
            f'no kernel headers for {release}, which BCC compiles against: install linux-headers-{release} '
            '(Debian/Ubuntu) or kernel-devel (RHEL), or point BCC_KERNEL_SOURCE at them'
        )
    return path


class BccProgram:
    """A BCC module compiled from a source file with -D macros; close() frees all of it."""

    def __init__(self, bpf: Any, bcc: Any):
        self._bpf = bpf
        self._bcc = bcc
        self._is_ring = False

    @classmethod
    def compile(cls, source: Path, defines: dict[str, str], bcc_module_path: str | None = None) -> BccProgram:
        bcc = import_bcc(bcc_module_path)
        check_kernel_headers()
        try:
            text = source.read_text()
        except OSError as e:
            raise BccError(f'cannot read the BCC source {source}: {e}') from None
        cflags = [f'-D{name}={value}' for name, value in sorted(defines.items())]
        cflags += [f'-I{source.parent}', '-Wno-unused-function']
        try:
            bpf = bcc.BPF(text=text.encode(), cflags=cflags)
        except Exception as e:  # BCC raises bare Exception for compile and load errors
            # BCC's C++ side wrote the compiler's and the verifier's messages to fd 2, which every
            # thread of the Agent shares: they are left there, never redirected (nor swallowed).
            raise BccError(
                f'{e}'.split('\n')[0] + ": the compiler's and the verifier's messages are on the process's standard "
                "error (the Agent's log; `ebpf-probe check` shows them)"
            ) from None
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
        try:
            attach(**kwargs)
        except Exception as e:  # BCC raises bare Exception, naming what failed
            raise BccError(f'attaching the {what} failed: {e}') from None

    def open_events(self, table: str, callback: Callable[[bytes], None], perf_pages: int) -> None:
        """Route the records of a ring buffer or perf buffer table (perf_pages per CPU) to callback(bytes)."""
        events = self._bpf[table.encode()]

        def on_sample(*args: Any) -> None:
            data, size = args[-2], args[-1]  # (ctx, data, size) or (cpu, data, size)
            callback(ctypes.string_at(data, size))

        def on_lost(_count: int) -> None:
            pass  # the BPF side counts what it could not write; without a callback BCC prints each loss

        if isinstance(events, self._bcc.table.RingBuf):
            self._is_ring = True
            events.open_ring_buffer(on_sample)
        else:
            events.open_perf_buffer(on_sample, page_cnt=perf_pages, lost_cb=on_lost)

    def consume(self) -> None:
        if self._is_ring:
            self._bpf.ring_buffer_consume()
        else:
            self._bpf.perf_buffer_poll(timeout=0)

    def table_fd(self, table: str) -> int:
        return int(self._bpf[table.encode()].map_fd)

    def array_u64(self, table: str, index: int = 0) -> int:
        return int(self._bpf[table.encode()][ctypes.c_int(index)].value)

    def close(self) -> None:
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()
