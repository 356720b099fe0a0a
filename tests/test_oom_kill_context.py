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

from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe

from .cgroups import VICTIM_PYTHON, VICTIM_SCRIPT, MemoryCgroup, vmstat_oom_kills
from .kernel_report import KernelLog

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


def in_new_pid_namespace(cgroup: MemoryCgroup, comm: str, as_init: bool) -> subprocess.Popen:
    """The victim in a pid namespace of its own: its init (pid 1), or a child of a shell that is."""
    victim = [VICTIM_PYTHON, '-c', VICTIM_SCRIPT, os.path.join(cgroup.dir, 'cgroup.procs'), comm, '0', '256', 'main',
              '-']  # fmt: skip
    inside = victim if as_init else ['sh', '-c', '"$@"; true', 'sh', *victim]  # the shell stays pid 1
    return subprocess.Popen(['unshare', '--pid', '--fork', '--kill-child', *inside], stderr=subprocess.DEVNULL)


@pytest.mark.parametrize('as_init', [True, False], ids=['main-process', 'worker'])
def test_a_containers_main_process_is_told_from_a_worker(probe, as_init):
    cgroup = MemoryCgroup()
    try:
        with KernelLog() as kernel_log:
            in_new_pid_namespace(cgroup, 'ns-victim', as_init).wait(timeout=120)
        [report] = [r for r in kernel_log.oom_reports() if r.comm == 'ns-victim']
        [kill] = mine(probe.get_and_flush().kills, cgroup)
        assert kill.victim_pid == report.pid  # the host's pid, as the kernel prints it
        assert kill.pid_ns_level == 1
        assert kill.ns_pid == (1 if as_init else 2)
        assert kill.container_main_process is as_init
    finally:
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
@pytest.mark.parametrize('main', [True, False], ids=['main-process', 'worker'])
def test_a_real_containers_kill_names_the_container_and_whether_it_was_its_main_process(dd_run_check, aggregator, main):
    """podman with crun (one VM row): the container id and cgroup the runtime made, and its pid 1 or not."""
    from datadog_checks.ebpf_probe import EbpfProbeCheck

    from .containers_runtime import ALLOCATOR, start_container

    # The allocator as the container's main process (exec: pid 1), or as a child of a shell that stays.
    command = ALLOCATOR if main else ALLOCATOR.replace('exec dd', 'dd') + '; sleep 600'
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False, 'check_tag_cardinality': 'high'}])
    try:
        dd_run_check(check)
        with start_container(memory='20m', command=command) as container:
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
            assert f'container_main_process:{str(main).lower()}' in event['tags']
            assert event['aggregation_key'] == container.id
            shown = re.sub(r'([_.-])', r'\\\1', container.cgroup)  # markdown-escaped
            assert f'| Memory cgroup | {shown} |' in event['msg_text']
            [point] = [m for m in aggregator.metrics('ebpf_probe.oom_kill.count') if f'container_id:{container.id}'
                       in m.tags]  # fmt: skip
            assert point.value == 1
            if not main:  # the container goes on without its worker
                assert json.loads(podman_inspect(container.id))[0]['State']['Running'] is True
    finally:
        check.cancel()


def podman_inspect(container_id: str) -> str:
    return subprocess.run(['podman', 'inspect', container_id], capture_output=True, text=True, check=True).stdout


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
