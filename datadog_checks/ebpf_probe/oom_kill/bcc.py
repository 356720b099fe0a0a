# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The OOM-kill probe compiled at run time by BCC (bpf/oom_kill_bcc.c): the fallback."""

from __future__ import annotations

import resource

from datadog_checks.ebpf_probe.kernel import features
from datadog_checks.ebpf_probe.kernel.bcc import BccError, BccProgram
from datadog_checks.ebpf_probe.kernel.btf import Btf, has_vmlinux_btf
from datadog_checks.ebpf_probe.kernel.libbpf import LibbpfUnavailable
from datadog_checks.ebpf_probe.kernel.requirements import RequirementError
from datadog_checks.ebpf_probe.kernel.uapi import BTF_KIND_ARRAY, BTF_KIND_PTR, BTF_KIND_STRUCT
from datadog_checks.ebpf_probe.resources import bpf_file

from . import hooks, record
from .probe import Logger, OOMKillProbe, OOMKillProbeOptions, perf_buffer_pages, ring_buffer_size

BCC_SOURCE = 'oom_kill_bcc.c'
BCC_ERRORS = (RequirementError, BccError)

# macro -> (struct, member path), several paths for fields renamed across kernels
_BTF_OFFSETS: dict[str, tuple[str, tuple[str, ...]]] = {
    'OFF_TASK_PID': ('task_struct', ('pid',)),
    'OFF_TASK_TGID': ('task_struct', ('tgid',)),
    'OFF_TASK_COMM': ('task_struct', ('comm',)),
    'OFF_TASK_MM': ('task_struct', ('mm',)),
    'OFF_TASK_SIGNAL': ('task_struct', ('signal',)),
    'OFF_TASK_REAL_CRED': ('task_struct', ('real_cred',)),
    'OFF_TASK_CGROUPS': ('task_struct', ('cgroups',)),
    'OFF_TASK_GROUP_LEADER': ('task_struct', ('group_leader',)),
    'OFF_TASK_START_TIME': ('task_struct', ('start_time',)),
    'OFF_TASK_THREAD_PID': ('task_struct', ('thread_pid',)),
    'OFF_TASK_REAL_PARENT': ('task_struct', ('real_parent',)),
    'OFF_TASK_CHILDREN': ('task_struct', ('children',)),
    'OFF_TASK_SIBLING': ('task_struct', ('sibling',)),
    'OFF_PID_LEVEL': ('pid', ('level',)),
    'OFF_PID_NUMBERS': ('pid', ('numbers',)),
    'OFF_UPID_NR': ('upid', ('nr',)),
    'OFF_CSS_PARENT': ('cgroup_subsys_state', ('parent',)),
    'OFF_CGROUP_LEVEL': ('cgroup', ('level',)),
    'OFF_MEMCG_CSS': ('mem_cgroup', ('css',)),
    'OFF_MEMCG_USAGE': ('mem_cgroup', ('memory.usage',)),
    'OFF_MEMCG_MAX': ('mem_cgroup', ('memory.max',)),
    'OFF_MEMCG_OOM_GROUP': ('mem_cgroup', ('oom_group',)),
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
    'OFF_TASK_START_BOOTTIME': ('task_struct', ('start_boottime',)),
    'OFF_MEMCG_EVENTS': ('mem_cgroup', ('memory_events',)),
    'OFF_CGROUP_PSI': ('cgroup', ('psi',)),
    'OFF_PSI_AVG': ('psi_group', ('avg',)),
}
# macro -> (enum, value): the memory.events entries and pressure rows the signal hook reads.
_BTF_ENUMS: dict[str, tuple[str, str]] = {
    'MEMCG_EVENT_LOW': ('memcg_memory_event', 'MEMCG_LOW'),
    'MEMCG_EVENT_HIGH': ('memcg_memory_event', 'MEMCG_HIGH'),
    'MEMCG_EVENT_MAX': ('memcg_memory_event', 'MEMCG_MAX'),
    'MEMCG_EVENT_OOM': ('memcg_memory_event', 'MEMCG_OOM'),
    'MEMCG_EVENT_OOM_KILL': ('memcg_memory_event', 'MEMCG_OOM_KILL'),
    'MEMCG_EVENT_OOM_GROUP_KILL': ('memcg_memory_event', 'MEMCG_OOM_GROUP_KILL'),  # 5.17+: left undefined before
    'PSI_MEM_SOME_ROW': ('psi_states', 'PSI_MEM_SOME'),
    'PSI_MEM_FULL_ROW': ('psi_states', 'PSI_MEM_FULL'),
}


def bcc_offsets(btf: Btf | None) -> dict[str, str]:
    """Macros giving the BCC variant the kernel's struct layout: from BTF, else from the kernel headers."""
    if btf is None:
        return {'OFFSETS_FROM_HEADERS': '1'}
    defines: dict[str, str] = {}
    missing = []
    for macro, (struct_name, paths) in _BTF_OFFSETS.items():
        for path in paths:
            try:
                defines[macro] = str(btf.member_path(struct_name, path)[0])
                break
            except LookupError:
                continue
        else:
            missing.append(f'{struct_name}.{paths[0]}')
    if missing:
        raise BccError(f'the kernel BTF lacks fields the probe reads: {", ".join(missing)}')
    # mm->rss_stat: percpu_counter[] since 6.2, struct mm_rss_stat { atomic_long_t count[]; } before.
    _, rss_type = btf.member_path('mm_struct', 'rss_stat')
    rss_type = btf.skip_modifiers(rss_type)
    if btf.kind(rss_type) == BTF_KIND_ARRAY:
        element, _ = btf.array(rss_type)
        counter = btf.member(element, 'count')
        if counter is None:
            raise BccError('the kernel BTF has an unknown mm_struct.rss_stat layout')
        defines['RSS_STAT_STRIDE'] = str(btf.size(element))
        defines['OFF_RSS_COUNT'] = str(counter[0])
    else:
        count_offset, count_type = btf.member_path('mm_rss_stat', 'count')
        element, _ = btf.array(count_type)
        defines['RSS_STAT_STRIDE'] = str(btf.size(element))
        defines['OFF_RSS_COUNT'] = str(count_offset)
    upid = btf.find('upid', BTF_KIND_STRUCT)
    if upid is None:
        raise BccError('the kernel BTF has no struct upid')
    defines['UPID_SIZE'] = str(btf.size(upid))
    memory_id = btf.enum_value('cgroup_subsys_id', 'memory_cgrp_id')
    defines['MEMORY_CGRP_ID'] = str(memory_id if memory_id is not None else -1)
    for macro, (enum_name, value_name) in _BTF_ENUMS.items():
        value = btf.enum_value(enum_name, value_name)
        if value is not None:
            defines[macro] = str(value)
        elif macro != 'MEMCG_EVENT_OOM_GROUP_KILL':
            raise BccError(f'the kernel BTF has no {enum_name} {value_name}')
    # struct cgroup's psi: a pointer from 6.1, the group itself before.
    _, psi_type = btf.member_path('cgroup', 'psi')
    defines['CGROUP_PSI_IS_POINTER'] = '1' if btf.kind(btf.skip_modifiers(psi_type)) == BTF_KIND_PTR else '0'
    return defines


class BccOOMKillProbe(OOMKillProbe):
    variant = 'bcc'

    def __init__(self, program: BccProgram, hooks_used: list[str], rejected: dict[str, str], perf_pages: int):
        self._program: BccProgram | None = program
        super().__init__(hooks_used, rejected)
        program.open_events('events', self._on_record, perf_pages)

    @classmethod
    def load(cls, options: OOMKillProbeOptions, log: Logger) -> BccOOMKillProbe:
        btf = None
        if has_vmlinux_btf():
            try:
                btf = Btf.open()  # the struct offsets come from it
            except (OSError, LibbpfUnavailable) as e:
                log.debug('kernel BTF unreadable, offsets come from kernel headers: %s', e)
        try:
            signal = hooks.SIGNAL_RAW_TP if options.user_space_kills else None
            plan = hooks.plan_hooks(
                hooks.RAW_TP, options.mount_tracefs, lambda: cls._task_offered(btf, options), signal
            )
            defines = bcc_offsets(btf)
        finally:
            if btf is not None:
                btf.close()
        defines['PAGE_SIZE_KB'] = str(record.PAGE_KB)
        perf_pages = 0
        if features.has_ring_buffer():
            defines['USE_RINGBUF'] = '1'
            defines['RINGBUF_PAGES'] = str(ring_buffer_size(options.max_buffered_kills) // resource.getpagesize())
        else:
            perf_pages = perf_buffer_pages(options.max_buffered_kills)
        return hooks.load_by_plan(
            plan, lambda plan: cls._compile_and_attach(options, plan, defines, perf_pages, log), log
        )

    @classmethod
    def _compile_and_attach(
        cls, options: OOMKillProbeOptions, plan: hooks.HookPlan, common: dict[str, str], perf_pages: int, log: Logger
    ) -> BccOOMKillProbe:
        defines = dict(common)
        if plan.use_task:
            defines['HOOK_RAW_TP'] = '1'
        if plan.use_kill_kprobe:
            defines['HOOK_KILL_KPROBE'] = '1'
        if plan.use_kprobe:
            defines['HOOK_KPROBE'] = '1'
            if plan.kprobe_writes_records:
                defines['KPROBE_WRITES_RECORDS'] = '1'
        if plan.signal is not None:
            defines['HOOK_SIGNAL'] = '1'
        # BCC attaches a TRACEPOINT_PROBE when it compiles it: compiled only when no kprobe is to attach.
        tracepoint_loaded = plan.use_tracepoint and not plan.use_kprobe
        if tracepoint_loaded:
            defines['HOOK_TRACEPOINT'] = '1'
            if plan.tracepoint_has_memory:
                defines['MARK_VICTIM_HAS_MM'] = '1'
        try:
            program = BccProgram.compile(bpf_file(BCC_SOURCE), defines, options.bcc_module_path)
        except BccError as e:
            if plan.signal is None:
                raise
            # The kill signals' program is beside the OOM hooks: without it, they still load.
            raise hooks.HookRefused(plan.signal, f'not loaded: {e}') from None
        attach = {
            hooks.RAW_TP.name: lambda: program.attach_raw_tracepoint('mark_victim', hooks.RAW_TP.program),
            hooks.KILL_KPROBE.name: lambda: program.attach_kprobe(
                hooks.KILL_FUNCTION, hooks.BCC_FUNCTIONS[hooks.KILL_KPROBE.name]
            ),
            hooks.KPROBE.name: lambda: program.attach_kprobe(
                'oom_kill_process', hooks.BCC_FUNCTIONS[hooks.KPROBE.name]
            ),
            hooks.TRACEPOINT.name: lambda: None,  # attached when compiled
            hooks.SIGNAL_RAW_TP.name: lambda: program.attach_raw_tracepoint(
                'signal_generate', hooks.SIGNAL_RAW_TP.program
            ),
        }
        try:
            if plan.signal is not None:
                cls.name_memory_killers(program.table_fd('memory_killers'), options.memory_killers)
            hooks_used = hooks.attach_by_plan(plan, lambda hook: attach[hook.name](), BccError, tracepoint_loaded, log)
            return cls(program, hooks_used, plan.rejected, perf_pages)
        except BaseException:
            program.close()
            raise

    @staticmethod
    def _task_offered(btf: Btf | None, options: OOMKillProbeOptions) -> tuple[bool, str]:
        if btf is not None:
            return hooks.task_hook_in_btf(btf)
        # Without BTF, the tracefs format tells the tracepoint's shape: the memory fields came with the task.
        fields = hooks.classic_tracepoint_fields(options.mount_tracefs)
        if isinstance(fields, str):
            return False, fields
        return ('total_vm' in fields, '' if 'total_vm' in fields else hooks.PID_ONLY)

    def _consume(self) -> None:
        if self._program is not None:
            self._program.consume()

    def _dropped_total(self) -> tuple[int, int]:
        if self._program is None:
            return self._dropped_seen
        kernel, signals = (
            self._program.array_u64('dropped_kills', kind) for kind in (record.DROPPED_KERNEL, record.DROPPED_SIGNAL)
        )
        return kernel, signals

    def _release(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None
