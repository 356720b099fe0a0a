# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The attach order both variants share, when the kernel refuses a hook (pure logic: attach is a fake).

The refusals themselves come from kernels these tests cannot choose (a kprobe blacklisted, a
function inlined); the real kernels run the paths where they attach."""

import logging

import pytest

from datadog_checks.ebpf_probe.oom_kill import hooks

pytestmark = pytest.mark.unit

log = logging.getLogger(__name__)


class Refused(Exception):
    pass


def attacher(refused: set[str]):
    attached = []

    def attach(hook: hooks.Hook) -> None:
        if hook.name in refused:
            raise Refused(f'{hook.name} refused')
        attached.append(hook.name)

    return attach, attached


def plan(**uses: bool) -> hooks.HookPlan:
    return hooks.HookPlan(hooks.TP_BTF, **uses)


def test_all_planned_hooks_attach_in_order_and_the_tracepoint_only_alone():
    attach, attached = attacher(set())
    used = hooks.attach_by_plan(plan(use_task=True, use_kprobe=True), attach, Refused, True, log)
    assert used == attached == [hooks.TP_BTF.name, hooks.KPROBE.name]
    attach, attached = attacher(set())
    used = hooks.attach_by_plan(plan(use_kprobe=True, use_tracepoint=True), attach, Refused, True, log)
    assert used == [hooks.KPROBE.name]  # the tracepoint is the kprobe's stand-in


def test_a_refused_kprobe_beside_another_hook_is_said_and_the_probe_goes_on():
    attach, _ = attacher({hooks.KPROBE.name})
    p = plan(use_task=True, use_kprobe=True)
    assert hooks.attach_by_plan(p, attach, Refused, False, log) == [hooks.TP_BTF.name]
    assert p.rejected[hooks.KPROBE.name] == f'{hooks.KPROBE.name} refused'


def test_a_refused_lone_kprobe_gives_way_to_the_loaded_tracepoint():
    attach, _ = attacher({hooks.KPROBE.name})
    p = plan(use_kprobe=True, use_tracepoint=True)
    assert hooks.attach_by_plan(p, attach, Refused, True, log) == [hooks.TRACEPOINT.name]
    assert hooks.KPROBE.name in p.rejected


def test_a_refused_lone_kprobe_with_the_tracepoint_not_loaded_loads_again_without_it():
    loads = []

    def load(p: hooks.HookPlan) -> list[str]:
        loads.append((p.use_kprobe, p.use_tracepoint))
        attach, _ = attacher({hooks.KPROBE.name})
        return hooks.attach_by_plan(p, attach, Refused, p.use_tracepoint and not p.use_kprobe, log)

    p = plan(use_kprobe=True, use_tracepoint=True)
    assert hooks.load_by_plan(p, load, log) == [hooks.TRACEPOINT.name]
    assert loads == [(True, True), (False, True)]
    assert p.rejected[hooks.KPROBE.name] == f'{hooks.KPROBE.name} refused'


def test_a_refused_kill_kprobe_loads_again_without_it_as_the_kprobe_then_writes_the_records():
    loads = []

    def load(p: hooks.HookPlan) -> list[str]:
        loads.append(p.kprobe_writes_records)
        attach, _ = attacher({hooks.KILL_KPROBE.name})
        return hooks.attach_by_plan(p, attach, Refused, True, log)

    p = plan(use_kill_kprobe=True, use_kprobe=True)
    assert hooks.load_by_plan(p, load, log) == [hooks.KPROBE.name]
    assert loads == [False, True]
    assert hooks.KILL_KPROBE.name in p.rejected


def test_refusals_one_after_the_other_each_load_again_until_the_tracepoint_alone():
    """The BCC variant's case: the kill kprobe refused, then the kprobe, whose load left out the tracepoint."""
    loads = []

    def load(p: hooks.HookPlan) -> list[str]:
        loads.append((p.use_kill_kprobe, p.use_kprobe))
        attach, _ = attacher({hooks.KILL_KPROBE.name, hooks.KPROBE.name})
        return hooks.attach_by_plan(p, attach, Refused, p.use_tracepoint and not p.use_kprobe, log)

    p = plan(use_kill_kprobe=True, use_kprobe=True, use_tracepoint=True)
    assert hooks.load_by_plan(p, load, log) == [hooks.TRACEPOINT.name]
    assert loads == [(True, True), (False, True), (False, False)]
    assert {hooks.KILL_KPROBE.name, hooks.KPROBE.name} <= p.rejected.keys()


def test_a_refused_lone_kprobe_without_a_tracepoint_fails_the_load_with_the_kernels_reason():
    attach, _ = attacher({hooks.KPROBE.name})
    with pytest.raises(Refused, match='refused'):
        hooks.attach_by_plan(plan(use_kprobe=True), attach, Refused, False, log)
