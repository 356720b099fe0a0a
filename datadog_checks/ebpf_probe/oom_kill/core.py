# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The OOM-kill probe from the CO-RE object (bpf/oom_kill.bpf.c), loaded through libbpf."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from datadog_checks.ebpf_probe.kernel import btf as kernel_btf
from datadog_checks.ebpf_probe.kernel import features, libbpf
from datadog_checks.ebpf_probe.kernel.requirements import RequirementError
from datadog_checks.ebpf_probe.kernel.uapi import BPF_MAP_TYPE_PERF_EVENT_ARRAY
from datadog_checks.ebpf_probe.resources import bpf_file

from . import hooks, record
from .probe import Logger, OOMKillProbe, OOMKillProbeOptions, perf_buffer_pages, ring_buffer_size

CORE_OBJECT = 'oom_kill.bpf.o'


def core_object() -> Path:
    """The compiled CO-RE object the probe loads (tests put another one in its place)."""
    return bpf_file(CORE_OBJECT)


# What makes the CO-RE path fail for a reason the BCC fallback may not share.
CORE_ERRORS = (RequirementError, libbpf.LibbpfError, libbpf.LibbpfUnavailable, OSError, ValueError)


class CoreOOMKillProbe(OOMKillProbe):
    variant = 'co-re'

    def __init__(self, obj: libbpf.BpfObject, hooks_used: list[str], rejected: dict[str, str], perf_pages: int):
        self._obj: libbpf.BpfObject | None = obj
        self._dropped_map = obj.map('dropped_kills')
        self._ring: libbpf.RingBuffer | None = None
        self._perf: libbpf.PerfBuffer | None = None
        super().__init__(hooks_used, rejected)
        events = obj.map('events').fd
        if perf_pages:
            self._perf = libbpf.PerfBuffer(events, perf_pages, self._on_record)
        else:
            self._ring = libbpf.RingBuffer(events, self._on_record)

    @classmethod
    def load(cls, options: OOMKillProbeOptions, log: Logger) -> CoreOOMKillProbe:
        path = core_object()
        if not path.exists():
            raise RequirementError(f'the CO-RE object {path} is missing: build it with `make bpf` (clang)')
        if options.btf_path:
            if not os.path.exists(options.btf_path):
                raise RequirementError(f'btf_path {options.btf_path} does not exist')
        elif not kernel_btf.has_vmlinux_btf():
            raise RequirementError(
                f'the kernel has no BTF ({kernel_btf.VMLINUX_BTF}), which CO-RE needs: use a kernel built with '
                "CONFIG_DEBUG_INFO_BTF=y, or set btf_path to this kernel's BTF (e.g. from BTFHub)"
            )
        signal = hooks.SIGNAL if options.user_space_kills else None
        plan = hooks.plan_hooks(hooks.TP_BTF, options.mount_tracefs, cls._task_offered, signal)
        return hooks.load_by_plan(plan, lambda plan: cls._load(path, plan, options, log), log)

    @classmethod
    def _load(cls, path: Path, plan: hooks.HookPlan, options: OOMKillProbeOptions, log: Logger) -> CoreOOMKillProbe:
        use_ringbuf = features.has_ring_buffer()
        obj = libbpf.BpfObject(str(path), btf_custom_path=options.btf_path)
        try:
            for hook, autoload in (
                (hooks.TP_BTF, plan.use_task),
                (hooks.KILL_KPROBE, plan.use_kill_kprobe),
                (hooks.KPROBE, plan.use_kprobe),
                (hooks.TRACEPOINT, plan.use_tracepoint),
                (hooks.SIGNAL, plan.signal is not None),
            ):
                obj.set_autoload(hook.program, autoload)
            kernel_btf.set_rodata(
                obj,
                {
                    'page_size_kb': struct.pack('<Q', record.PAGE_KB),
                    'kprobe_writes_records': struct.pack('<?', plan.kprobe_writes_records),
                    'use_ringbuf': struct.pack('<?', use_ringbuf),
                },
            )
            if plan.kprobe_writes_records or not plan.use_kprobe:
                obj.map('oom_controls').set_max_entries(1)  # only the kprobe beside a task hook fills it
            events = obj.map('events')
            perf_pages = 0
            if use_ringbuf:
                events.set_max_entries(ring_buffer_size(options.max_buffered_kills))
            else:
                perf_pages = perf_buffer_pages(options.max_buffered_kills)
                events.set_type(BPF_MAP_TYPE_PERF_EVENT_ARRAY)
                events.set_key_size(4)
                events.set_value_size(4)
                events.set_max_entries(0)  # libbpf sizes it to the number of CPUs
            try:
                obj.load()
            except libbpf.LibbpfError as e:
                if plan.signal is None:
                    raise
                # The kill signals' program is beside the OOM hooks: without it, they still load.
                raise hooks.HookRefused(plan.signal, f'not loaded: {e}') from None
            if plan.signal is not None:
                cls.name_memory_killers(obj.map('memory_killers').fd, options.memory_killers)
            hooks_used = hooks.attach_by_plan(
                plan, lambda hook: obj.attach(hook.program), libbpf.LibbpfError, plan.use_tracepoint, log
            )
            return cls(obj, hooks_used, plan.rejected, perf_pages)
        except BaseException:
            obj.close()
            raise

    @staticmethod
    def _task_offered() -> tuple[bool, str]:
        if not kernel_btf.has_vmlinux_btf():
            return False, f"tp_btf needs the kernel's own BTF at {kernel_btf.VMLINUX_BTF}"
        return hooks.task_hook_in_btf()

    def _consume(self) -> None:
        if self._ring is not None:
            self._ring.consume()
        elif self._perf is not None:
            self._perf.consume()

    def _dropped_total(self) -> tuple[int, int]:
        if self._obj is None:
            return self._dropped_seen
        kernel, signals = (
            struct.unpack('<Q', self._dropped_map.lookup(struct.pack('<I', kind), 8))[0]
            for kind in (record.DROPPED_KERNEL, record.DROPPED_SIGNAL)
        )
        return kernel, signals

    def _release(self) -> None:
        if self._ring is not None:
            self._ring.free()
            self._ring = None
        if self._perf is not None:
            self._perf.free()
            self._perf = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
