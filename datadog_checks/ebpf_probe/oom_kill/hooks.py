# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Where the OOM-kill probe hooks into the kernel: the one table of hooks, and which to use here.

The choice is made from what the running kernel offers (its BTF, tracefs, kprobe support),
never from its version number: the mark_victim tracepoint's shape changed in 6.9 and was
backported to some stable releases of older series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from datadog_checks.ebpf_probe.kernel import features, kallsyms
from datadog_checks.ebpf_probe.kernel.btf import Btf, has_vmlinux_btf
from datadog_checks.ebpf_probe.kernel.requirements import RequirementError
from datadog_checks.ebpf_probe.kernel.uapi import BTF_KIND_PTR, BTF_KIND_TYPEDEF

from . import record


@dataclass(frozen=True)
class Hook:
    name: str  # as logged, and shown in events ("Seen by")
    record_id: int  # the record's `hook` field
    program: str  # its program (CO-RE object) or function (BCC source)
    gives: str


TP_BTF = Hook(
    'tp_btf/mark_victim', record.HOOK_TP_BTF, 'mark_victim_btf', 'the victim task: everything but oom_control'
)
RAW_TP = Hook('raw_tracepoint/mark_victim', record.HOOK_RAW_TP, 'oom_mark_victim_raw', 'the same as tp_btf, for BCC')
KILL_KPROBE = Hook(
    'kprobe/__oom_kill_process',
    record.HOOK_KILL_KPROBE,
    'oom_kill_victim',
    'each process killed, with its task (group members too), where the tracepoint passes only a pid',
)
KPROBE = Hook(
    'kprobe/oom_kill_process',
    record.HOOK_KPROBE,
    'oom_kill_process',
    'oom_control: the OOM domain, its size, badness, memcg vs system; writes the records itself '
    'when no hook sees each victim',
)
TRACEPOINT = Hook(
    'tracepoint/oom/mark_victim',
    record.HOOK_TRACEPOINT,
    'mark_victim_tracepoint',
    "the tracepoint's fields (only the victim thread's id before ~6.9); no cgroup",
)
SIGNAL = Hook(
    'tp_btf/signal_generate',
    record.HOOK_SIGNAL,
    'signal_generate_btf',
    "kill signals sent from user space: a memory killer's SIGKILL and SIGTERM, a container's main process's SIGKILL",
)
SIGNAL_RAW_TP = Hook(
    'raw_tracepoint/signal_generate', record.HOOK_SIGNAL_RAW_TP, 'signal_generate_raw', 'the same, for BCC'
)
HOOKS = (TP_BTF, RAW_TP, KILL_KPROBE, KPROBE, TRACEPOINT, SIGNAL, SIGNAL_RAW_TP)
HOOK_NAMES = {hook.record_id: hook.name for hook in HOOKS}
# The BCC source's functions for the kprobes (its tracepoint hooks are named as in the object).
BCC_FUNCTIONS = {KILL_KPROBE.name: 'oom_kill_victim_kprobe', KPROBE.name: 'oom_kill_process_kprobe'}
KILL_FUNCTION = '__oom_kill_process'

PID_ONLY = "this kernel's mark_victim tracepoint passes only a pid (kernels before ~6.9)"
# Hooks never used, by name: not an option, a seam for the tests that take one away (they
# monkeypatch it) to run the others as a kernel without it would.
WITHHELD: frozenset[str] = frozenset()
WITHHELD_REASON = 'withheld (a test of the other hooks)'


@dataclass
class HookPlan:
    task: Hook  # the hook with the victim's task: TP_BTF (CO-RE) or RAW_TP (BCC)
    # The kill signals' hook, SIGNAL (CO-RE) or SIGNAL_RAW_TP (BCC); None when not asked for.
    signal: Hook | None = None
    use_task: bool = False
    use_kill_kprobe: bool = False
    use_kprobe: bool = False
    # Loaded when there is no task hook: attached if the kprobe is not (or fails to attach).
    use_tracepoint: bool = False
    tracepoint_has_memory: bool = False
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def kprobe_writes_records(self) -> bool:
        """Beside a hook that sees each victim's task, the kprobe only leaves its oom_control facts for it."""
        return not (self.use_task or self.use_kill_kprobe)

    def drop(self, hook: Hook, reason: str) -> None:
        """Plan without this hook from now on."""
        if hook is self.task:
            self.use_task = False
        elif hook is KILL_KPROBE:
            self.use_kill_kprobe = False
        elif hook is KPROBE:
            self.use_kprobe = False
        elif hook is TRACEPOINT:
            self.use_tracepoint = False
        elif hook is self.signal:
            self.signal = None
        self.rejected[hook.name] = reason


class HookRefused(Exception):
    """A hook the programs were built around did not attach: they are to be loaded again without it."""

    def __init__(self, hook: Hook, reason: str):
        super().__init__(reason)
        self.hook = hook


Loaded = TypeVar('Loaded')


def load_by_plan(
    plan: HookPlan, load: Callable[[HookPlan], Loaded], log: logging.Logger | logging.LoggerAdapter
) -> Loaded:
    """load(plan); again without each hook the kernel refused to attach, when the programs were built around it.

    Each refusal takes a hook out of the plan, so this ends."""
    while True:
        try:
            return load(plan)
        except HookRefused as e:
            log.debug('%s not attached (%s): loading the probe again without it', e.hook.name, e)
            plan.drop(e.hook, str(e))


def attach_by_plan(
    plan: HookPlan,
    attach: Callable[[Hook], object],
    refusal: type[Exception],
    tracepoint_loaded: bool,
    log: logging.Logger | logging.LoggerAdapter,
) -> list[str]:
    """Attach the planned hooks, in the order the variants share; returns the names of those attached.

    attach(hook) raises `refusal` when the kernel refuses it. The kprobe on oom_kill_process is
    optional beside another hook; without one, the classic tracepoint takes its place (raising
    HookRefused when that needs another load).
    """
    attached = []
    if plan.use_task:
        attach(plan.task)
        attached.append(plan.task.name)
    if plan.use_kill_kprobe:
        try:
            attach(KILL_KPROBE)
        except refusal as e:
            raise HookRefused(KILL_KPROBE, str(e)) from None  # whether the kprobe writes records depends on it
        attached.append(KILL_KPROBE.name)
    if plan.use_kprobe:
        try:
            attach(KPROBE)
            attached.append(KPROBE.name)
        except refusal as e:
            plan.rejected[KPROBE.name] = str(e)
            if not attached and not plan.use_tracepoint:
                raise
            if not attached and not tracepoint_loaded:
                raise HookRefused(KPROBE, str(e)) from None
            log.debug('%s not attached: %s', KPROBE.name, e)
    if plan.use_tracepoint and not attached:
        attach(TRACEPOINT)
        attached.append(TRACEPOINT.name)
    if plan.signal is not None:  # beside the OOM hooks, never instead of one: a refusal is only said
        try:
            attach(plan.signal)
            attached.append(plan.signal.name)
        except refusal as e:
            plan.rejected[plan.signal.name] = str(e)
    return attached


def plan_hooks(
    task: Hook, mount_tracefs: bool, task_offered: Callable[[], tuple[bool, str]], signal: Hook | None = None
) -> HookPlan:
    """Which hooks to use here; task_offered() says whether the kernel offers the task hook, and why not;
    signal: the kill signals' hook, when asked for."""
    plan = HookPlan(task, signal=signal if signal is None or signal.name not in WITHHELD else None)
    if signal is not None and plan.signal is None:
        plan.rejected[signal.name] = WITHHELD_REASON
    disabled = WITHHELD
    if task.name in disabled:
        plan.rejected[task.name] = WITHHELD_REASON
    else:
        plan.use_task, reason = task_offered()
        if not plan.use_task:
            plan.rejected[task.name] = reason
    if KPROBE.name in disabled:
        plan.rejected[KPROBE.name] = WITHHELD_REASON
    else:
        plan.use_kprobe, reason = features.kprobe_support()
        if not plan.use_kprobe:
            plan.rejected[KPROBE.name] = reason
    if KILL_KPROBE.name in disabled:
        plan.rejected[KILL_KPROBE.name] = WITHHELD_REASON
    elif plan.use_task:
        plan.rejected[KILL_KPROBE.name] = f'not needed: {task.name} sees each victim'
    elif not features.kprobe_support()[0]:
        plan.rejected[KILL_KPROBE.name] = features.kprobe_support()[1]
    elif not kallsyms.has_function(KILL_FUNCTION):
        plan.rejected[KILL_KPROBE.name] = f'/proc/kallsyms has no {KILL_FUNCTION} (inlined in this kernel?)'
    else:
        plan.use_kill_kprobe = True
    if TRACEPOINT.name in disabled:
        plan.rejected[TRACEPOINT.name] = WITHHELD_REASON
    elif not plan.use_task:
        fields = classic_tracepoint_fields(mount_tracefs)
        if isinstance(fields, str):
            plan.rejected[TRACEPOINT.name] = fields
        else:
            plan.use_tracepoint = True
            plan.tracepoint_has_memory = 'total_vm' in fields
    if not (plan.use_task or plan.use_kill_kprobe or plan.use_kprobe or plan.use_tracepoint):
        raise RequirementError(
            'no usable OOM hook: ' + '; '.join(f'{hook}: {why}' for hook, why in plan.rejected.items())
        )
    return plan


def classic_tracepoint_fields(mount_tracefs: bool) -> list[str] | str:
    """The fields of the oom:mark_victim tracepoint, or why it cannot be used."""
    try:
        tracefs = features.ensure_tracefs(mount_tracefs)
    except RequirementError as e:
        return str(e)
    fmt = features.tracepoint_format(tracefs, 'oom', 'mark_victim')
    if fmt is None:
        return 'the kernel has no oom:mark_victim tracepoint'
    return features.tracepoint_fields(fmt)


def task_hook_in_btf(btf: Btf | None = None) -> tuple[bool, str]:
    """Whether the kernel's BTF shows the mark_victim tracepoint passing the victim's task.

    The task argument and the tracepoint's memory fields came in the same kernel change, so the
    fields of trace_event_raw_mark_victim tell; when that struct cannot be read, the tracepoint's
    prototype does.
    """
    if btf is None and not has_vmlinux_btf():
        return False, 'the task hook needs the kernel BTF'
    own = btf is None
    btf = btf or Btf.open()
    try:
        fields = btf.struct_members('trace_event_raw_mark_victim')
        if fields is not None:
            return ('total_vm' in fields, '' if 'total_vm' in fields else PID_ONLY)
        return mark_victim_passes_task(btf)
    finally:
        if own:
            btf.close()


def mark_victim_passes_task(btf: Btf) -> tuple[bool, str]:
    """Whether the mark_victim tracepoint's prototype (btf_trace_mark_victim) passes a task_struct."""
    type_id = btf.find('btf_trace_mark_victim', BTF_KIND_TYPEDEF)
    if type_id is None:
        return False, 'the kernel BTF has no mark_victim tracepoint'
    params = btf.func_proto_params(type_id)
    if len(params) >= 2:  # the first is the context pointer
        first = btf.skip_modifiers(params[1])
        if btf.kind(first) == BTF_KIND_PTR and btf.name(btf.skip_modifiers(btf.pointee(first))) == 'task_struct':
            return True, ''
    return False, PID_ONLY
