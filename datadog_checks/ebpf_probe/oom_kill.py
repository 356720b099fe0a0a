# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The OOM-kill probe: a factory that loads it, get_and_flush(), close().

The kernel side (bpf/oom_kill.bpf.c, bpf/oom_kill_bcc.c) writes one record per
OOM kill to a ring buffer; get_and_flush() drains it. The CO-RE object is
loaded first; BCC's runtime compilation is the fallback.
"""

from __future__ import annotations

import logging
import os
import resource
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import kernel, libbpf
from .bcc_loader import BccError, BccProgram, bcc_offsets
from .kernel import RequirementError
from .resources import bpf_file

# --- The record (mirror of bpf/oom_kill.h) ---------------------------------

COMM_LEN = 16
CGROUP_MAX_DEPTH = 8
CGROUP_NAME_LEN = 128
STACK_DEPTH = 20

HOOK_TP_BTF = 1
HOOK_KPROBE = 2
HOOK_TRACEPOINT = 3
HOOK_RAW_TP = 4
HOOK_NAMES = {
    HOOK_TP_BTF: 'tp_btf/mark_victim',
    HOOK_KPROBE: 'kprobe/oom_kill_process',
    HOOK_TRACEPOINT: 'tracepoint/oom/mark_victim',
    HOOK_RAW_TP: 'raw_tracepoint/mark_victim',
}

F_MEMCG = 1 << 0
F_CONSTRAINT_KNOWN = 1 << 1
F_VICTIM_TASK = 1 << 2
F_MEMORY = 1 << 3
F_OOM_CONTROL = 1 << 4
F_CGROUP = 1 << 5
F_CGROUP_TRUNCATED = 1 << 6
F_SIGKILL = 1 << 7

RECORD = struct.Struct(
    '<'
    '7Q'  # timestamp_ns, total_vm_kb, anon/file/shmem_rss_kb, pgtables_kb, oom_domain_pages
    'qQ'  # badness_points (signed), cgroup_id
    '6I'  # victim_pid, victim_tid, victim_uid, trigger_pid, trigger_tid, flags
    'hBB'  # oom_score_adj, hook, cgroup_depth
    'I'  # kernel_stack_depth
    f'{COMM_LEN}s{COMM_LEN}s'  # victim_comm, trigger_comm
    f'{STACK_DEPTH}Q'  # kernel_stack
    f'{CGROUP_MAX_DEPTH * CGROUP_NAME_LEN}s'  # cgroup_names, leaf first
)

# Functions whose presence on the trigger's kernel stack means a memory cgroup,
# not the whole system, ran out of memory (names vary across kernel versions).
MEMCG_OOM_FUNCTIONS = frozenset(
    {'mem_cgroup_out_of_memory', 'mem_cgroup_oom', 'mem_cgroup_oom_synchronize', 'try_charge_memcg', 'try_charge'}
)
# The OOM killer's entry points: on the stack without the above, the system was out of memory.
SYSTEM_OOM_FUNCTIONS = frozenset({'out_of_memory', '__alloc_pages_may_oom', 'pagefault_out_of_memory'})

CORE_OBJECT = 'oom_kill.bpf.o'
BCC_SOURCE = 'oom_kill_bcc.c'


@dataclass(frozen=True)
class VictimMemory:
    """The victim's memory when it was chosen, in kB (as the kernel's OOM report prints it)."""

    total_vm_kb: int
    anon_rss_kb: int
    file_rss_kb: int
    shmem_rss_kb: int
    pgtables_kb: int

    @property
    def rss_kb(self) -> int:
        return self.anon_rss_kb + self.file_rss_kb + self.shmem_rss_kb


@dataclass(frozen=True)
class OOMKill:
    """One OOM kill, as the kernel saw it."""

    timestamp: float  # Unix time of the kill
    victim_pid: int
    victim_tid: int
    victim_comm: str | None
    victim_uid: int | None
    oom_score_adj: int | None
    trigger_pid: int
    trigger_tid: int
    trigger_comm: str
    # True: a memory cgroup hit its limit; False: the whole system ran out; None: unknown.
    memcg_oom: bool | None
    # The victim's memory cgroup, read in the kernel at kill time, e.g. '/kubepods/burstable/pod.../<id>'.
    cgroup_path: str | None
    cgroup_id: int | None
    cgroup_path_truncated: bool
    memory: VictimMemory | None
    # Only from the oom_kill_process hook: the OOM domain's size in pages and the
    # victim's badness points in it (the kernel's ranking, not /proc/PID/oom_score).
    oom_domain_pages: int | None
    badness_points: int | None
    sigkill: bool  # SIGKILL was pending: a kill, not only an exiting task marked
    hook: str

    @property
    def trigger_type(self) -> str:
        if self.memcg_oom is None:
            return 'unknown'
        return 'cgroup' if self.memcg_oom else 'system'

    @property
    def cgroup_name(self) -> str | None:
        """Leaf of the cgroup path ('/' for the root)."""
        if self.cgroup_path is None:
            return None
        return self.cgroup_path.rstrip('/').rsplit('/', 1)[-1] or '/'


@dataclass
class FlushResult:
    kills: list[OOMKill] = field(default_factory=list)
    dropped: int = 0  # kills the kernel side had no room for since the last flush


def _text(raw: bytes) -> str:
    """A NUL-terminated kernel string; bytes that are not UTF-8 stay visible as escapes."""
    return raw.split(b'\0', 1)[0].decode('utf-8', 'backslashreplace')


def memcg_from_stack(stack: tuple[int, ...], symbols: kernel.KernelSymbols) -> bool | None:
    """Whether the trigger's kernel stack went through the memcg OOM path; None if it cannot tell."""
    names = {symbols.find(ip) for ip in stack}
    if names & MEMCG_OOM_FUNCTIONS:
        return True
    if names & SYSTEM_OOM_FUNCTIONS:
        return False
    return None


def decode_record(raw: bytes, boot_to_unix: float, symbols: kernel.KernelSymbols) -> OOMKill:
    (
        timestamp_ns, total_vm, anon, file, shmem, pgtables, domain_pages, badness, cgroup_id,
        victim_pid, victim_tid, victim_uid, trigger_pid, trigger_tid, flags,
        oom_score_adj, hook, cgroup_depth, stack_depth, victim_comm, trigger_comm, *rest,
    ) = RECORD.unpack_from(raw)  # fmt: skip
    stack, cgroup_names = tuple(rest[:STACK_DEPTH]), rest[STACK_DEPTH]
    victim_task = bool(flags & F_VICTIM_TASK)

    if flags & F_CONSTRAINT_KNOWN:
        memcg_oom: bool | None = bool(flags & F_MEMCG)
    else:
        memcg_oom = memcg_from_stack(stack[: min(stack_depth, STACK_DEPTH)], symbols)

    cgroup_path = None
    if flags & F_CGROUP:
        depth = min(cgroup_depth, CGROUP_MAX_DEPTH)
        names = [_text(cgroup_names[i * CGROUP_NAME_LEN : (i + 1) * CGROUP_NAME_LEN]) for i in reversed(range(depth))]
        cgroup_path = '/' + '/'.join(names)
        if flags & F_CGROUP_TRUNCATED and depth == CGROUP_MAX_DEPTH:
            cgroup_path = '/...' + cgroup_path

    memory = None
    if flags & F_MEMORY:
        memory = VictimMemory(total_vm, anon, file, shmem, pgtables)
    has_oc = bool(flags & F_OOM_CONTROL)

    return OOMKill(
        timestamp=boot_to_unix + timestamp_ns / 1e9,
        victim_pid=victim_pid,
        victim_tid=victim_tid,
        victim_comm=_text(victim_comm) if victim_task else None,
        victim_uid=victim_uid if victim_task else None,
        oom_score_adj=oom_score_adj if victim_task else None,
        trigger_pid=trigger_pid,
        trigger_tid=trigger_tid,
        trigger_comm=_text(trigger_comm),
        memcg_oom=memcg_oom,
        cgroup_path=cgroup_path,
        cgroup_id=cgroup_id if flags & F_CGROUP else None,
        cgroup_path_truncated=bool(flags & F_CGROUP_TRUNCATED),
        memory=memory,
        oom_domain_pages=domain_pages if has_oc else None,
        badness_points=badness if has_oc else None,
        sigkill=bool(flags & F_SIGKILL),
        hook=HOOK_NAMES.get(hook, str(hook)),
    )


def monotonic_to_unix() -> float:
    """Offset that turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) seconds into Unix time."""
    return time.time() - time.monotonic_ns() / 1e9


# --- Options and errors -------------------------------------------------------


@dataclass(frozen=True)
class OOMKillProbeOptions:
    enable_core: bool = True
    allow_runtime_compiled_fallback: bool = True
    mount_tracefs: bool = True
    # BTF for CO-RE relocations on kernels without /sys/kernel/btf/vmlinux (e.g. from BTFHub).
    btf_path: str | None = None
    # Kills the kernel side holds between two flushes (the ring buffer is sized for at least this).
    max_buffered_kills: int = 512
    # Tests only: another CO-RE object file, and hooks not to use (by name, as in HOOK_NAMES).
    core_object_path: str | None = None
    disabled_hooks: frozenset[str] = frozenset()


class ProbeLoadError(RuntimeError):
    """The probe could not be loaded; the message says why and what to do."""


class OOMKillProbe(Protocol):
    variant: str  # 'co-re' or 'bcc'
    hooks: list[str]  # attached hooks
    rejected_hooks: dict[str, str]  # hook -> why it is not used here
    core_error: str | None  # why CO-RE failed, when this is the BCC fallback
    limitations: tuple[str, ...]

    def get_and_flush(self) -> FlushResult: ...

    def close(self) -> None: ...


def ring_buffer_size(max_kills: int) -> int:
    """Smallest power-of-two ring buffer (at least a page) holding max_kills records and their headers."""
    need = max(1, max_kills) * (RECORD.size + 8)
    size = max(resource.getpagesize(), 1)
    while size < need:
        size *= 2
    return size


def load_oom_kill_probe(options: OOMKillProbeOptions, log: logging.Logger | logging.LoggerAdapter) -> OOMKillProbe:
    """Load the probe: CO-RE first, then BCC if allowed. Raises ProbeLoadError saying what is missing."""
    if not options.enable_core and not options.allow_runtime_compiled_fallback:
        raise ProbeLoadError(
            'nothing to load: enable_core and allow_runtime_compiled_fallback are both false; enable one'
        )
    version = kernel.kernel_version()
    try:
        kernel.check_kernel_version(version)
        kernel.check_privileges(version)
        kernel.check_lockdown()
        kernel.raise_memlock_limit(version)
    except RequirementError as e:
        raise ProbeLoadError(str(e)) from None

    if not options.enable_core:
        try:
            return BccOOMKillProbe.load(options, log)
        except (RequirementError, BccError) as e:
            raise ProbeLoadError(f'runtime compilation with BCC failed: {e}') from None

    try:
        return CoreOOMKillProbe.load(options, log)
    except (RequirementError, libbpf.LibbpfError, libbpf.LibbpfUnavailable, OSError) as core_error:
        if not options.allow_runtime_compiled_fallback:
            raise ProbeLoadError(
                f'CO-RE load failed: {core_error}. Set allow_runtime_compiled_fallback: true to compile '
                'the probe at run time with BCC instead'
            ) from None
        log.warning(
            'CO-RE load of the OOM kill probe failed (%s); falling back to runtime compilation with BCC', core_error
        )
        try:
            probe = BccOOMKillProbe.load(options, log)
            probe.core_error = str(core_error)
            return probe
        except (RequirementError, BccError) as bcc_error:
            raise ProbeLoadError(
                f'CO-RE load failed: {core_error}; BCC runtime compilation failed too: {bcc_error}'
            ) from None


# --- Hook choice ----------------------------------------------------------------


@dataclass
class HookPlan:
    mark_victim_task: bool = False  # tp_btf (CO-RE) / raw tracepoint (BCC) with the task argument
    kprobe: bool = False
    tracepoint: bool = False
    tracepoint_has_mm: bool = False
    rejected: dict[str, str] = field(default_factory=dict)


PID_ONLY = "this kernel's mark_victim tracepoint passes only a pid (kernels before ~6.9)"


def task_hook_available() -> tuple[bool, str]:
    """Whether the kernel's BTF shows the mark_victim tracepoint passing the victim's task.

    The task argument and the tracepoint's memory fields came in the same kernel change, so the
    fields of trace_event_raw_mark_victim, found in a fraction of a millisecond, tell. When that
    quick look cannot tell, libbpf parses the BTF and reads the prototype itself.
    """
    if not kernel.has_vmlinux_btf():
        return False, f"tp_btf needs the kernel's own BTF at {kernel.VMLINUX_BTF}"
    fields = kernel.btf_struct_members('trace_event_raw_mark_victim')
    if fields is not None:
        return ('total_vm' in fields, '' if 'total_vm' in fields else PID_ONLY)
    with libbpf.Btf.load_vmlinux() as btf:
        return mark_victim_passes_task(btf)


def mark_victim_passes_task(btf: libbpf.Btf) -> tuple[bool, str]:
    """Whether the mark_victim tracepoint's prototype passes the victim's task_struct."""
    type_id = btf.find('btf_trace_mark_victim', libbpf.BTF_KIND_TYPEDEF)
    if type_id is None:
        return False, 'the kernel BTF has no mark_victim tracepoint'
    params = btf.func_proto_params(type_id)
    if len(params) >= 2:
        first = btf.skip_modifiers(params[1])
        if btf.kind(first) == libbpf.BTF_KIND_PTR and btf.name(btf.skip_modifiers(btf.pointee(first))) == 'task_struct':
            return True, ''
    return False, PID_ONLY


def _plan_tracepoint(plan: HookPlan, options: OOMKillProbeOptions, name: str) -> None:
    try:
        tracefs = kernel.ensure_tracefs(options.mount_tracefs)
    except RequirementError as e:
        plan.rejected[name] = str(e)
        return
    fmt = kernel.tracepoint_format(tracefs, 'oom', 'mark_victim')
    if fmt is None:
        plan.rejected[name] = 'the kernel has no oom:mark_victim tracepoint'
        return
    plan.tracepoint = True
    plan.tracepoint_has_mm = 'total_vm' in kernel.tracepoint_fields(fmt)


def _plan(options: OOMKillProbeOptions, task_hook: str, task_hook_check: tuple[bool, str] | None) -> HookPlan:
    """Which hooks to use; task_hook_check is (available, why not), or None when it cannot be told yet."""
    plan = HookPlan()
    disabled = 'disabled by the probe options'
    if task_hook in options.disabled_hooks:
        plan.rejected[task_hook] = disabled
    elif task_hook_check is not None:
        plan.mark_victim_task, reason = task_hook_check
        if not plan.mark_victim_task:
            plan.rejected[task_hook] = reason
    kprobe = HOOK_NAMES[HOOK_KPROBE]
    if kprobe in options.disabled_hooks:
        plan.rejected[kprobe] = disabled
    else:
        plan.kprobe, reason = kernel.kprobe_support()
        if not plan.kprobe:
            plan.rejected[kprobe] = reason
    tracepoint = HOOK_NAMES[HOOK_TRACEPOINT]
    if tracepoint in options.disabled_hooks:
        plan.rejected[tracepoint] = disabled
    elif not plan.mark_victim_task:
        _plan_tracepoint(plan, options, tracepoint)
    if not (plan.mark_victim_task or plan.kprobe or plan.tracepoint):
        raise RequirementError(
            'no usable OOM hook: ' + '; '.join(f'{hook}: {why}' for hook, why in plan.rejected.items())
        )
    return plan


# --- CO-RE ----------------------------------------------------------------------

_CORE_PROGRAMS = {
    'mark_victim_btf': HOOK_NAMES[HOOK_TP_BTF],
    'oom_kill_process': HOOK_NAMES[HOOK_KPROBE],
    'mark_victim_tracepoint': HOOK_NAMES[HOOK_TRACEPOINT],
}


class _Drain:
    """Shared get_and_flush logic: consume pending records, decode them, count drops once."""

    _symbols = kernel.KernelSymbols(MEMCG_OOM_FUNCTIONS | SYSTEM_OOM_FUNCTIONS)

    core_error: str | None = None
    hooks: list[str]
    rejected_hooks: dict[str, str]
    limitations: tuple[str, ...] = ()  # the OOM probe works fully or not at all

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._dropped_seen = 0
        self._flush_lock = threading.Lock()

    def _prefetch_symbols(self) -> None:
        """Without the kprobe, memcg vs system comes from kernel stacks: have kallsyms ready for the first kill."""
        if HOOK_NAMES[HOOK_KPROBE] not in self.hooks:
            self._symbols.prefetch()

    def _on_record(self, raw: bytes) -> None:
        self._pending.append(raw)

    def _consume(self) -> None:
        raise NotImplementedError

    def _dropped_total(self) -> int:
        raise NotImplementedError

    def get_and_flush(self) -> FlushResult:
        with self._flush_lock:
            self._consume()
            raws, self._pending = self._pending, []
            dropped_total = self._dropped_total()
            dropped, self._dropped_seen = dropped_total - self._dropped_seen, dropped_total
        offset = monotonic_to_unix()
        return FlushResult([decode_record(raw, offset, self._symbols) for raw in raws], dropped)


class CoreOOMKillProbe(_Drain):
    """The probe from the CO-RE object, loaded through libbpf."""

    variant = 'co-re'

    def __init__(self, obj: libbpf.BpfObject, hooks: list[str], rejected: dict[str, str], use_ringbuf: bool):
        super().__init__()
        self._obj: libbpf.BpfObject | None = obj
        self.hooks = hooks
        self.rejected_hooks = rejected
        self._dropped_map = obj.map('dropped_kills')
        self._ring: libbpf.RingBuffer | None = None
        self._perf: libbpf.PerfBuffer | None = None
        events = obj.map('events').fd
        if use_ringbuf:
            self._ring = libbpf.RingBuffer(events, self._on_record)
        else:
            self._perf = libbpf.PerfBuffer(events, 64, self._on_record)

    @classmethod
    def load(cls, options: OOMKillProbeOptions, log: logging.Logger | logging.LoggerAdapter) -> CoreOOMKillProbe:
        path = Path(options.core_object_path) if options.core_object_path else bpf_file(CORE_OBJECT)
        if not path.exists():
            raise RequirementError(f'the CO-RE object {path} is missing: build it with `make bpf` (clang)')
        if options.btf_path:
            if not os.path.exists(options.btf_path):
                raise RequirementError(f'btf_path {options.btf_path} does not exist')
        elif not kernel.has_vmlinux_btf():
            raise RequirementError(
                f'the kernel has no BTF ({kernel.VMLINUX_BTF}), which CO-RE needs: use a kernel built with '
                "CONFIG_DEBUG_INFO_BTF=y, or set btf_path to this kernel's BTF (e.g. from BTFHub)"
            )
        plan = _plan(options, HOOK_NAMES[HOOK_TP_BTF], task_hook_available())

        obj = libbpf.BpfObject(str(path), btf_custom_path=options.btf_path)
        try:
            wanted = {
                'mark_victim_btf': plan.mark_victim_task,
                'oom_kill_process': plan.kprobe,
                'mark_victim_tracepoint': plan.tracepoint,
            }
            for program, autoload in wanted.items():
                obj.set_autoload(program, autoload)
            obj.set_rodata(
                {
                    'page_size_kb': struct.pack('<Q', max(1, resource.getpagesize() // 1024)),
                    'kprobe_writes_records': struct.pack('<?', not plan.mark_victim_task),
                }
            )
            if not (plan.mark_victim_task and plan.kprobe):
                obj.map('oom_controls').set_max_entries(1)  # only the kprobe-beside-tp_btf pairing uses it
            use_ringbuf = libbpf.probe_map_type(libbpf.BPF_MAP_TYPE_RINGBUF)
            events = obj.map('events')
            if use_ringbuf:
                events.set_max_entries(ring_buffer_size(options.max_buffered_kills))
            else:
                events.set_type(libbpf.BPF_MAP_TYPE_PERF_EVENT_ARRAY)
                events.set_key_size(4)
                events.set_value_size(4)
                events.set_max_entries(0)  # libbpf sizes it to the number of CPUs
            obj.load()
            hooks = cls._attach(obj, plan, log)
            probe = cls(obj, hooks, plan.rejected, use_ringbuf)
            probe._prefetch_symbols()
            return probe
        except BaseException:
            obj.close()
            raise

    @staticmethod
    def _attach(obj: libbpf.BpfObject, plan: HookPlan, log: logging.Logger | logging.LoggerAdapter) -> list[str]:
        hooks = []
        if plan.mark_victim_task:
            obj.attach('mark_victim_btf')
            hooks.append(_CORE_PROGRAMS['mark_victim_btf'])
        if plan.kprobe:
            try:
                obj.attach('oom_kill_process')
                hooks.append(_CORE_PROGRAMS['oom_kill_process'])
            except libbpf.LibbpfError as e:
                plan.rejected[_CORE_PROGRAMS['oom_kill_process']] = str(e)
                if not hooks and not plan.tracepoint:
                    raise
                log.debug('kprobe on oom_kill_process not attached: %s', e)
        if plan.tracepoint and not hooks:
            obj.attach('mark_victim_tracepoint')
            hooks.append(_CORE_PROGRAMS['mark_victim_tracepoint'])
        return hooks

    def _consume(self) -> None:
        if self._ring is not None:
            self._ring.consume()
        elif self._perf is not None:
            self._perf.consume()

    def _dropped_total(self) -> int:
        if self._obj is None:
            return self._dropped_seen
        kernel_side = struct.unpack('<Q', self._dropped_map.lookup(b'\0\0\0\0', 8))[0]
        return kernel_side + (self._perf.lost if self._perf is not None else 0)

    def close(self) -> None:
        with self._flush_lock:
            if self._ring is not None:
                self._ring.free()
                self._ring = None
            if self._perf is not None:
                self._perf.free()
                self._perf = None
            if self._obj is not None:
                self._obj.close()
                self._obj = None


# --- BCC ------------------------------------------------------------------------


class BccOOMKillProbe(_Drain):
    """The probe compiled at run time by BCC."""

    variant = 'bcc'

    def __init__(self, program: BccProgram, hooks: list[str], rejected: dict[str, str]):
        super().__init__()
        self._program: BccProgram | None = program
        self.hooks = hooks
        self.rejected_hooks = rejected
        program.open_events('events', self._on_record)

    @classmethod
    def load(cls, options: OOMKillProbeOptions, log: logging.Logger | logging.LoggerAdapter) -> BccOOMKillProbe:
        btf = None
        if kernel.has_vmlinux_btf():
            try:
                btf = libbpf.Btf.load_vmlinux()  # BCC needs the offsets from it anyway
            except (libbpf.LibbpfError, libbpf.LibbpfUnavailable) as e:
                log.debug('kernel BTF unreadable, offsets come from kernel headers: %s', e)
        try:
            plan = _plan(options, HOOK_NAMES[HOOK_RAW_TP], mark_victim_passes_task(btf) if btf else None)
            if btf is None and HOOK_NAMES[HOOK_RAW_TP] not in options.disabled_hooks:
                plan.mark_victim_task = cls._task_hook_from_tracefs(plan, options)
            defines = bcc_offsets(btf)
        finally:
            if btf is not None:
                btf.close()
        use_ringbuf = kernel.kernel_version()[:2] >= (5, 8)
        defines['PAGE_SIZE_KB'] = str(max(1, resource.getpagesize() // 1024))
        if use_ringbuf:
            defines['USE_RINGBUF'] = '1'
            defines['RINGBUF_PAGES'] = str(ring_buffer_size(options.max_buffered_kills) // resource.getpagesize())
        if plan.mark_victim_task:
            defines['HOOK_RAW_TP'] = '1'
        if plan.kprobe:
            defines['HOOK_KPROBE'] = '1'
            if not plan.mark_victim_task:
                defines['KPROBE_WRITES_RECORDS'] = '1'
        if plan.tracepoint and not plan.mark_victim_task and not plan.kprobe:
            defines['HOOK_TRACEPOINT'] = '1'
            if plan.tracepoint_has_mm:
                defines['MARK_VICTIM_HAS_MM'] = '1'
        program = BccProgram.compile(bpf_file(BCC_SOURCE), defines)
        try:
            hooks = []
            if plan.mark_victim_task:
                program.attach_raw_tracepoint('mark_victim', 'oom_mark_victim_raw')
                hooks.append(HOOK_NAMES[HOOK_RAW_TP])
            if plan.kprobe:
                try:
                    program.attach_kprobe('oom_kill_process', 'oom_kill_process_kprobe')
                    hooks.append(HOOK_NAMES[HOOK_KPROBE])
                except BccError as e:
                    plan.rejected[HOOK_NAMES[HOOK_KPROBE]] = str(e)
                    if not hooks:
                        raise
            if 'HOOK_TRACEPOINT' in defines:
                hooks.append(HOOK_NAMES[HOOK_TRACEPOINT])  # BCC attached TRACEPOINT_PROBE when compiling
            probe = cls(program, hooks, plan.rejected)
            probe._prefetch_symbols()
            return probe
        except BaseException:
            program.close()
            raise

    @staticmethod
    def _task_hook_from_tracefs(plan: HookPlan, options: OOMKillProbeOptions) -> bool:
        """Without BTF, the tracefs format tells the tracepoint's shape: the memory fields came with the task."""
        if not plan.tracepoint:
            _plan_tracepoint(plan, options, HOOK_NAMES[HOOK_TRACEPOINT])
        if plan.tracepoint_has_mm:
            return True
        plan.rejected[HOOK_NAMES[HOOK_RAW_TP]] = "this kernel's mark_victim tracepoint passes only a pid"
        return False

    def _consume(self) -> None:
        if self._program is not None:
            self._program.consume()

    def _dropped_total(self) -> int:
        if self._program is None:
            return self._dropped_seen
        return self._program.array_u64('dropped_kills') + self._program.lost

    def close(self) -> None:
        with self._flush_lock:
            if self._program is not None:
                self._program.close()
                self._program = None
