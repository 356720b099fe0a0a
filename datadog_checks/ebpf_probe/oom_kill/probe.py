# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The OOM-kill probe as both variants share it: its options, its buffers' sizes, get_and_flush(), close().

The kernel side (bpf/oom_kill.bpf.c, bpf/oom_kill_bcc.c) writes one record per OOM kill
to a ring buffer (a perf buffer on kernels without one); get_and_flush() drains it.
"""

from __future__ import annotations

import logging
import resource
import struct
import threading
from dataclasses import dataclass

from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.kernel.kallsyms import KernelSymbols

from . import hooks, record
from .record import FlushResult

Logger = logging.Logger | logging.LoggerAdapter

# A perf-buffer sample: perf_event_header (8 bytes) and the u32 size before the record, padded to 8.
PERF_SAMPLE_SIZE = (8 + 4 + record.RECORD.size + 7) // 8 * 8
RING_SAMPLE_SIZE = 8 + record.RECORD.size  # the ring buffer's 8-byte header, then the record


# Processes that kill for want of memory from user space, by name (comm: at most 15 characters).
DEFAULT_MEMORY_KILLERS = ('systemd-oomd', 'earlyoom', 'oomd', 'nohang', 'lmkd')


@dataclass(frozen=True)
class OOMKillProbeOptions:
    enable_core: bool = True
    allow_runtime_compiled_fallback: bool = True
    mount_tracefs: bool = False  # mounting changes the host for every process: only when asked
    # BTF for CO-RE relocations on kernels without /sys/kernel/btf/vmlinux (e.g. from BTFHub).
    btf_path: str | None = None
    # The folder of BCC's Python module (its `bcc` package), for a Python that does not see it.
    bcc_module_path: str | None = None
    # Kills the kernel side holds between two flushes (the buffer is sized for at least this;
    # a perf buffer, per CPU: any CPU may see all of them).
    max_buffered_kills: int = 512
    # Kill signals from user space: by these memory killers, and SIGKILLs that end containers.
    user_space_kills: bool = True
    memory_killers: tuple[str, ...] = DEFAULT_MEMORY_KILLERS


def _pow2_pages(size: int) -> int:
    page = resource.getpagesize()
    pages = 1
    while pages * page < size:
        pages *= 2
    return pages


def ring_buffer_size(max_kills: int) -> int:
    """Bytes of a ring buffer (a power-of-two number of pages) holding max_kills records."""
    return _pow2_pages(max(1, max_kills) * RING_SAMPLE_SIZE) * resource.getpagesize()


def perf_buffer_pages(max_kills: int) -> int:
    """Pages of each CPU's perf buffer (a power of two) holding max_kills records."""
    return _pow2_pages(max(1, max_kills) * PERF_SAMPLE_SIZE)


class OOMKillProbe:
    """What both variants share: drain the records, decode them, count drops once.

    A variant attaches its hooks and implements _consume(), _dropped_total() and _release().
    """

    variant: str
    # Without the kprobe, memcg vs system comes from kernel stacks and kallsyms.
    _symbols = KernelSymbols(record.MEMCG_OOM_FUNCTIONS | record.SYSTEM_OOM_FUNCTIONS)

    def __init__(self, hooks_used: list[str], rejected: dict[str, str]):
        signal_hooks = (hooks.SIGNAL.name, hooks.SIGNAL_RAW_TP.name)
        self.hooks = [hook for hook in hooks_used if hook not in signal_hooks]  # the OOM killer's
        # The kill signals' hook, when attached (kills sent from user space).
        self.signal_hook = next((hook for hook in hooks_used if hook in signal_hooks), None)
        self.rejected_hooks = rejected
        # Said once: why the kill signals' hook did not attach; on the BCC fallback, why CO-RE failed.
        self.limitations: tuple[str, ...] = tuple(
            f'kills sent from user space (memory killers, container runtimes) are not reported: {rejected[hook.name]}'
            for hook in (hooks.SIGNAL, hooks.SIGNAL_RAW_TP)
            if hook.name in rejected and rejected[hook.name] != hooks.WITHHELD_REASON
        )
        self._pending: list[bytes] = []
        self._dropped_seen = (0, 0)  # the kernel's kills, kill signals
        self._flush_lock = threading.Lock()
        if hooks.KPROBE.name not in hooks_used:
            self._symbols.prefetch()  # have kallsyms ready for the first kill

    @staticmethod
    def name_memory_killers(map_fd: int, names: tuple[str, ...]) -> None:
        """Fill the kernel side's map of memory killers' names, as the kernel keeps a name (comm)."""
        for name in names:
            key = name.encode()[: record.COMM_LEN - 1].ljust(record.COMM_LEN, b'\0')
            libbpf.map_update_elem(map_fd, key, b'\1')

    def _on_record(self, raw: bytes) -> None:
        self._pending.append(raw)

    def _consume(self) -> None:
        raise NotImplementedError

    def _dropped_total(self) -> tuple[int, int]:
        """Records the kernel side could not write since it was loaded: the kernel's kills, kill signals."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def get_and_flush(self) -> FlushResult:
        with self._flush_lock:
            self._consume()
            raws, self._pending = self._pending, []
            dropped_total = self._dropped_total()
            dropped = tuple(now - before for now, before in zip(dropped_total, self._dropped_seen, strict=True))
            self._dropped_seen = dropped_total
        offset = record.monotonic_to_unix()
        kills, undecodable, decode_error = [], 0, None
        for raw in raws:  # drained already: a record that does not decode must cost only itself
            try:
                kills.append(record.decode_record(raw, offset, self._symbols, hooks.HOOK_NAMES))
            except (struct.error, ValueError, LookupError) as e:
                undecodable += 1
                decode_error = decode_error or f'{type(e).__name__}: {e} ({len(raw)} bytes)'
        kills.sort(key=lambda kill: kill.timestamp)  # perf buffers are per CPU: drained CPU by CPU
        signals = [kill for kill in kills if kill.signal is not None]
        kernel = [kill for kill in kills if kill.signal is None]
        return FlushResult(kernel, signals, dropped[0], dropped[1], undecodable, decode_error)

    def close(self) -> None:
        with self._flush_lock:
            self._release()
