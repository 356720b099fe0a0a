# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Every OOM kill once, with its context, against the kernel's own report and counters:
multi-threaded victims, the cgroup that ran out, the container's main process, group kills."""

import json
import logging
import os
import re
import subprocess
import time
import uuid

import pytest

from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe, record

from .cgroups import VICTIM_PYTHON, VICTIM_SCRIPT, MemoryCgroup, vmstat_oom_kills
from .kernel_report import KernelLog, KernelOomReport

pytestmark = [pytest.mark.kernel, pytest.mark.oom, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
PAGE_KB = os.sysconf('SC_PAGE_SIZE') // 1024
# The most a CPU keeps charged ahead for a memory cgroup (MEMCG_CHARGE_BATCH: 32 before 6.1, 64 since).
CHARGE_CACHE_PAGES = 64


@pytest.fixture(params=['co-re', pytest.param('bcc', marks=pytest.mark.bcc)])
def probe(request):
    options = OOMKillProbeOptions(enable_core=request.param == 'co-re', allow_runtime_compiled_fallback=True)
    probe = load_oom_kill_probe(options, log)
    probe.get_and_flush()  # whatever happened before the test
    yield probe
    probe.close()


def mine(kills, cgroup: MemoryCgroup):
    return [k for k in kills if k.cgroup_path is not None and k.cgroup_path.startswith(cgroup.path)]


@pytest.mark.parametrize('threads', [1, 4, pytest.param(16, marks=pytest.mark.slow)])
def test_a_multi_threaded_process_killed_is_one_kill(probe, threads):
    """The kernel marks more threads of a dying process: still one kill per process, as it counts them."""
    cgroup = MemoryCgroup(limit_mb=64)
    try:
        before = vmstat_oom_kills()
        with KernelLog() as kernel_log:
            victims = [cgroup.oom_kill(comm=f'threads-{threads}-{i}', mode=f'threads:{threads}') for i in range(3)]
        kills = mine(probe.get_and_flush().kills, cgroup)
        assert [k.victim_pid for k in kills] == [v.pid for v in victims]
        assert [r.pid for r in kernel_log.oom_reports()] == [v.pid for v in victims]
        assert cgroup.kernel_oom_kills() == len(kills)
        assert vmstat_oom_kills() - before >= len(kills)  # the host's counter (other kills may add to it)
    finally:
        cgroup.remove()


def test_the_cgroup_that_ran_out_is_named_with_its_usage_and_limit(probe):
    """A pod's limit, hit while its container's own cgroup has none: the kernel's oom_memcg, not task_memcg."""
    pod = f'ebpf-probe-pod-{uuid.uuid4().hex[:6]}'
    cgroup = MemoryCgroup(limit_mb=48, below=(pod,), limit_on_parent=True)
    try:
        with KernelLog(full=True) as kernel_log:
            victim = cgroup.oom_kill(comm='in-pod')
        [kill] = mine(probe.get_and_flush().kills, cgroup)
        [report] = kernel_log.oom_reports()
        assert report.oom_memcg == f'/{pod}' and report.task_memcg == cgroup.path
        assert kill.victim_pid == victim.pid
        assert kill.cgroup_path == report.task_memcg
        assert kill.domain is not None
        assert kill.domain.cgroup_path == report.oom_memcg
        assert kill.domain.limit_kb == report.limit_kb == 48 * 1024
        # Usage is read as the victim is chosen, the kernel prints it moments later: meanwhile the
        # pages CPUs had charged ahead (their per-CPU charge caches) may be given back by the
        # drain the OOM path started (seen on 5.10: 49,152 kB read, 49,028 kB printed).
        assert kill.domain.usage_kb <= kill.domain.limit_kb
        assert abs(kill.domain.usage_kb - report.usage_kb) <= CHARGE_CACHE_PAGES * os.cpu_count() * PAGE_KB
        assert kill.memcg_oom is True and kill.trigger_type == 'cgroup'
        assert cgroup.kernel_oom_kills() == 1  # counted in the victim's own cgroup
    finally:
        cgroup.remove()


# What runs in a pid namespace of its own (unshare --pid --fork), the victim's place in it, and what
# the victim was to it: (what runs as pid 1, its arguments up to the victim; the victim's mode; role,
# its parent's comm, pid there, and whether the victim was its oldest living child).
SHELL = ['sh', '-c', '"$@"; true', 'sh']  # stays, and runs its arguments as a child
PID_NAMESPACES = {
    'pid-1': ([], 'main', record.PID_1, None),
    'child-of-a-shell-as-pid-1': (SHELL, 'main', record.CHILD_OF_PID_1, ('sh', 1, True)),
    'younger-child-of-a-shell-as-pid-1': (['sh', '-c', 'sleep 600 & "$@"; true', 'sh'], 'main',
                                          record.CHILD_OF_PID_1, ('sh', 1, False)),
    'worker': (SHELL + SHELL, 'main', record.DESCENDANT, ('sh', 2, True)),
    'tini': (['tini', '--'], 'main', record.CHILD_OF_MINIMAL_INIT, ('tini', 1, True)),
    'dumb-init': (['dumb-init'], 'main', record.CHILD_OF_MINIMAL_INIT, ('dumb-init', 1, True)),
    'catatonit': (['catatonit', '--'], 'main', record.CHILD_OF_MINIMAL_INIT, ('catatonit', 1, True)),
    # tini's child stays; a shell under it starts the victim in the background and exits.
    'orphan-adopted-by-tini': (['tini', '--', 'sh', '-c', '"$@"; exec sleep 600', 'sh', 'sh', '-c', '"$@" &', 'sh'],
                               'adopted', record.ADOPTED_BY_MINIMAL_INIT, ('tini', 1, False)),
}  # fmt: skip
MINIMAL_INIT_CASES = {'tini', 'dumb-init', 'catatonit', 'orphan-adopted-by-tini'}


def victim_command(cgroup: MemoryCgroup, mode: str) -> list[str]:
    return [VICTIM_PYTHON, '-c', VICTIM_SCRIPT, os.path.join(cgroup.dir, 'cgroup.procs'), 'ns-victim', '0', '256',
            mode, '-']  # fmt: skip


def namespace_init(unshare: subprocess.Popen) -> int:
    """The host's pid of the pid 1 that `unshare --fork` started."""
    deadline = time.monotonic() + 30
    while True:
        with open(f'/proc/{unshare.pid}/task/{unshare.pid}/children') as f:
            started = [int(child) for child in f.read().split()]
        if started:
            return started[0]
        assert time.monotonic() < deadline, 'unshare started nothing'
        time.sleep(0.01)


def the_kill(kernel_log: KernelLog, comm: str) -> KernelOomReport:
    """The kernel's report of the kill, once printed: what runs around the victim may stay, so this
    waits for the report, not for a process to end. The kernel counts the kill (memory.events,
    vmstat) before it marks the victim (the probe's hook) and prints the report after both."""
    deadline = time.monotonic() + 120
    while True:
        reports = [r for r in kernel_log.oom_reports() if r.comm == comm]
        if reports:
            [report] = reports
            return report
        assert time.monotonic() < deadline, f'{comm} was not OOM-killed'
        time.sleep(0.05)


@pytest.mark.parametrize('case', [pytest.param(case, marks=pytest.mark.minimal_init) if case in MINIMAL_INIT_CASES
                                  else case for case in PID_NAMESPACES])  # fmt: skip
def test_what_the_victim_was_to_its_pid_namespace_decides_whether_its_container_stopped(probe, case):
    """pid 1 ends its namespace; a minimal init (tini, dumb-init, catatonit) ends with the child it
    started, not with an orphan it adopted; another init's choice is not known."""
    init, mode, role, parent = PID_NAMESPACES[case]
    cgroup = MemoryCgroup()
    namespace = None
    try:
        with KernelLog() as kernel_log:
            namespace = subprocess.Popen(['unshare', '--pid', '--fork', '--kill-child', *init,
                                          *victim_command(cgroup, mode)], stderr=subprocess.DEVNULL)  # fmt: skip
            ns_init = namespace_init(namespace) if parent is not None else None  # it outlives the victim
            report = the_kill(kernel_log, 'ns-victim')
        [kill] = mine(probe.get_and_flush().kills, cgroup)
        assert kill.victim_pid == report.pid  # the host's pid, as the kernel prints it
        assert kill.pid_ns_level == 1
        assert kill.container_role == role
        assert kill.container_main_process is record.CONTAINER_ROLES[role]
        if parent is None:
            assert kill.ns_pid == 1
            return
        comm, ns_pid, oldest = parent
        assert kill.parent is not None
        assert (kill.parent.comm, kill.parent.ns_pid, kill.parent.oldest_child) == (comm, ns_pid, oldest)
        assert kill.ns_pid > ns_pid
        if ns_pid == 1:
            assert kill.parent.pid == ns_init
    finally:
        if namespace is not None:
            namespace.kill()  # --kill-child: its pid 1, and with it the whole namespace
            namespace.wait(timeout=60)
        cgroup.remove()


def test_a_process_started_into_a_pid_namespace_from_outside_is_not_known_to_be_its_main(probe):
    """nsenter (as `docker exec`, or a runtime starting a container into a pod's shared namespace)."""
    cgroup = MemoryCgroup()
    namespace = entered = None
    try:
        namespace = subprocess.Popen(['unshare', '--pid', '--fork', '--kill-child', 'sleep', '600'])
        ns_init = namespace_init(namespace)
        with KernelLog() as kernel_log:
            entered = subprocess.Popen(['nsenter', '--target', str(ns_init), '--pid', '--',
                                        *victim_command(cgroup, 'main')], stderr=subprocess.DEVNULL)  # fmt: skip
            entered.wait(timeout=120)
        [report] = [r for r in kernel_log.oom_reports() if r.comm == 'ns-victim']
        [kill] = mine(probe.get_and_flush().kills, cgroup)
        assert kill.victim_pid == report.pid
        assert kill.pid_ns_level == 1 and kill.ns_pid > 1
        assert kill.container_role == record.ENTERED and kill.container_main_process is None
        assert kill.parent is not None
        assert (kill.parent.pid, kill.parent.comm, kill.parent.ns_pid) == (entered.pid, 'nsenter', None)
    finally:
        if namespace is not None:
            namespace.kill()
            namespace.wait(timeout=60)
        cgroup.remove()


def test_a_process_in_the_hosts_pid_namespace_is_no_containers(probe, memory_cgroup):
    memory_cgroup.oom_kill(comm='host-victim')
    [kill] = mine(probe.get_and_flush().kills, memory_cgroup)
    assert kill.pid_ns_level == 0 and kill.container_main_process is None


@pytest.mark.cgroup_v2
def test_a_group_kill_reports_every_member_once(probe):
    """memory.oom.group: the kernel kills the whole cgroup, members through a path that skips oom_kill_process."""
    cgroup = MemoryCgroup(limit_mb=64)
    members = []
    try:
        with open(os.path.join(cgroup.dir, 'memory.oom.group'), 'w') as f:
            f.write('1')
        with KernelLog() as kernel_log:
            for i in range(3):
                members.append(cgroup.start(f'member-{i}', alloc_mb=8, mode='hold'))
                assert members[-1].stdout.readline() == b'ready\n'
            allocator = cgroup.start('allocator', alloc_mb=256)
            allocator.wait(timeout=120)
            for member in members:
                member.wait(timeout=60)
        killed = {r.pid for r in kernel_log.oom_reports()}
        assert killed == {allocator.pid} | {m.pid for m in members}
        kills = mine(probe.get_and_flush().kills, cgroup)
        assert sorted(k.victim_pid for k in kills) == sorted(killed)
        assert all(k.group_cgroup_path == cgroup.path for k in kills)
        assert sum(k.chosen for k in kills) == 1
        # The kernel kills (and counts) the chosen victim a second time with its group.
        assert cgroup.kernel_oom_kills() == len(kills) + 1
    finally:
        for member in members:
            member.kill()
        cgroup.remove()


@pytest.mark.system_oom
def test_a_system_oom_is_told_from_a_cgroups(probe):
    """The whole machine out of memory (only ever in a throwaway VM): the kernel's CONSTRAINT_NONE."""
    with open('/proc/meminfo') as f:
        total_mb = int(next(line for line in f if line.startswith('MemTotal:')).split()[1]) // 1024
    cgroup = MemoryCgroup(limit_mb=4 * total_mb)  # a cgroup of its own, with a limit it never reaches
    try:
        with KernelLog(full=True) as kernel_log:
            victim = cgroup.oom_kill(comm='system-oom', oom_score_adj=1000, mode='threads:1')  # 4 MB at a time
        [report] = [r for r in kernel_log.oom_reports() if r.pid == victim.pid]
        assert report.constraint == 'CONSTRAINT_NONE'
        [kill] = mine(probe.get_and_flush().kills, cgroup)
        assert kill.victim_pid == victim.pid
        assert kill.memcg_oom is False and kill.trigger_type == 'system'
        assert kill.domain is None
    finally:
        cgroup.remove()


@pytest.mark.container_runtime
@pytest.mark.parametrize('case', ['main-process', 'under-init', 'worker', 'child-of-a-shell'])
def test_a_real_containers_kill_names_the_container_and_whether_it_was_its_main_process(dd_run_check, aggregator, case):
    """podman with crun (one VM row): the container id and cgroup the runtime made, and whether its death
    stopped the container: pid 1, the child of `podman run --init`, a worker (a shell's child under a
    shell as pid 1), or not known (the child of a shell as pid 1, which may or may not exit with it)."""
    from datadog_checks.ebpf_probe import EbpfProbeCheck

    from .containers_runtime import ALLOCATOR, podman, start_container

    # The allocator as the container's main process (exec: pid 1, or catatonit's child under --init),
    # as a worker, or as the child of the shell that is pid 1 and stays.
    child = ALLOCATOR.replace('exec dd', 'dd') + '; true'
    command = {'worker': f"sh -c '{child}'; sleep 600", 'child-of-a-shell': child + '; sleep 600'}.get(case, ALLOCATOR)
    main = {'main-process': True, 'under-init': True, 'worker': False}.get(case)
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False, 'check_tag_cardinality': 'high'}])
    try:
        dd_run_check(check)
        with start_container(memory='20m', command=command, init=case == 'under-init') as container:
            with open(f'/proc/{container.pid}/root/tmp/go', 'w'):
                pass
            deadline = time.monotonic() + 60
            events = []
            while not events and time.monotonic() < deadline:
                time.sleep(0.5)
                aggregator.reset()
                dd_run_check(check)
                events = [e for e in aggregator.events if f'container_id:{container.id}' in e['tags']]
            [event] = events
            assert 'container_runtime:podman' in event['tags']
            if main is None:
                assert not any(t.startswith('container_main_process:') for t in event['tags'])
                assert 'whether the container stopped depends on what **sh** does' in event['msg_text']
            else:
                assert f'container_main_process:{str(main).lower()}' in event['tags']
            assert event['aggregation_key'] == container.id
            shown = re.sub(r'([_.-])', r'\\\1', container.cgroup)  # markdown-escaped
            assert f'| Memory cgroup | {shown} |' in event['msg_text']
            if case == 'under-init':
                assert 'the child its init **podman\\-init** (pid 1) started' in event['msg_text']
            [point] = [m for m in aggregator.metrics('ebpf_probe.oom_kill.count') if f'container_id:{container.id}'
                       in m.tags]  # fmt: skip
            assert point.value == 1
            # As the event says: the container stopped with its main process, or goes on without a worker.
            if main:
                podman('wait', container.id)
            if main is not None:
                assert json.loads(podman('inspect', container.id))[0]['State']['Running'] is not main
    finally:
        check.cancel()


@pytest.mark.system_oom
@pytest.mark.cgroup_v2
def test_a_group_kill_in_a_system_oom_is_one_group_every_member_none_unaccounted(dd_run_check, aggregator):
    """Kubernetes sets memory.oom.group on every container (1.28+, cgroup v2): in a system OOM too the
    kernel kills the whole group (mem_cgroup_get_oom_group takes the root as the domain)."""
    from datadog_checks.ebpf_probe import EbpfProbeCheck

    with open('/proc/meminfo') as f:
        total_mb = int(next(line for line in f if line.startswith('MemTotal:')).split()[1]) // 1024
    cgroup = MemoryCgroup(limit_mb=4 * total_mb)  # never reached: the machine runs out first
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    members = []
    try:
        with open(os.path.join(cgroup.dir, 'memory.oom.group'), 'w') as f:
            f.write('1')
        dd_run_check(check)
        with KernelLog(full=True) as kernel_log:
            for i in range(3):
                members.append(cgroup.start(f'sys-member-{i}', oom_score_adj=1000, alloc_mb=8, mode='hold'))
                assert members[-1].stdout.readline() == b'ready\n'
            allocator = cgroup.start('sys-allocator', oom_score_adj=1000, mode='threads:1')  # 4 MB at a time
            allocator.wait(timeout=300)
            for member in members:
                member.wait(timeout=60)
        pids = {allocator.pid} | {m.pid for m in members}
        reports = [r for r in kernel_log.oom_reports() if r.pid in pids]
        assert {r.pid for r in reports} == pids  # the kernel killed the whole group
        assert 'CONSTRAINT_NONE' in {r.constraint for r in reports}
        aggregator.reset()
        dd_run_check(check)
        [event] = [e for e in aggregator.events if e['msg_title'].startswith('OOM group kill')]
        assert event['msg_title'] == f'OOM group kill: {len(pids)} processes in {cgroup.name}'
        assert 'trigger_type:system' in event['tags']
        counted = sum(m.value for m in aggregator.metrics('ebpf_probe.oom_kill.count'))
        assert counted == len(pids)
        aggregator.assert_metric('ebpf_probe.oom_kill.unaccounted', value=0, count=1)
    finally:
        check.cancel()
        for member in members:
            member.kill()
        cgroup.remove()
