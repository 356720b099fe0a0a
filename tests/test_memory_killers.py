# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Kills sent from user space, on the real kernel: a process named as each memory killer signals a
process in a memory cgroup of its own; the records name both and hold the cgroup's memory as the
kernel's own files show it. An ordinary `kill -9` is not recorded."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe, record
from datadog_checks.ebpf_probe.oom_kill.probe import DEFAULT_MEMORY_KILLERS
from datadog_checks.ebpf_probe.oom_kill.user_space import SignalKills

from .processes import read_until

pytestmark = [pytest.mark.kernel]

log = logging.getLogger(__name__)

# Names itself as the killer (PR_SET_NAME: the kernel's comm of the thread that sends), then signals.
KILLER = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
os.kill(int(sys.argv[2]), int(sys.argv[3]))
"""
# The kernel's per-CPU charge batch (MEMCG_CHARGE_BATCH, pages): a cgroup's usage moves by this much
# without its processes doing anything, as CPUs return what they held.
CHARGE_BATCH_PAGES = 64


@pytest.fixture(scope='module')
def probe():
    probe = load_oom_kill_probe(OOMKillProbeOptions(), log)
    try:
        yield probe
    finally:
        probe.close()


def signal_records(probe, victim_pid: int, deadline: float = 10.0) -> list[record.OOMKill]:
    """Every signal record drained until one for this victim is in (the kernel side writes it a moment later)."""
    ends = time.monotonic() + deadline
    drained: list[record.OOMKill] = []
    while time.monotonic() < ends:
        drained += probe.get_and_flush().signals
        if any(kill.victim_pid == victim_pid for kill in drained):
            break
        time.sleep(0.05)
    return drained


def cgroup_file(memory_cgroup, name: str) -> dict[str, str]:
    """A flat-keyed cgroup file (memory.events) or memory.pressure's lines, as {key: rest}."""
    with open(os.path.join(memory_cgroup.dir, name)) as f:
        return dict(line.split(' ', 1) for line in f.read().splitlines())


def pressure_avg10(line: str) -> float:
    return float(dict(item.split('=') for item in line.split())['avg10'])


def usage_and_limit_kb(memory_cgroup) -> tuple[int, int]:
    names = (
        ('memory.usage_in_bytes', 'memory.limit_in_bytes')
        if memory_cgroup.version == 1
        else ('memory.current', 'memory.max')
    )
    values = []
    for name in names:
        with open(os.path.join(memory_cgroup.dir, name)) as f:
            values.append(int(f.read()) // 1024)
    return values[0], values[1]


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL], ids=['SIGTERM', 'SIGKILL'])
@pytest.mark.parametrize('killer', DEFAULT_MEMORY_KILLERS)
def test_a_memory_killers_signal_is_recorded_with_the_victims_cgroup_as_the_kernel_shows_it(
    probe, memory_cgroup, killer, sig
):
    assert probe.signal_hook == 'tp_btf/signal_generate', probe.limitations  # every kernel of the matrix has it
    victim = memory_cgroup.start('mk-victim', alloc_mb=8, mode='hold')
    try:
        assert victim.stdout.readline() == b'ready\n'
        probe.get_and_flush()
        usage_kb, limit_kb = usage_and_limit_kb(memory_cgroup)
        if memory_cgroup.version == 2:
            events = cgroup_file(memory_cgroup, 'memory.events')
            has_pressure = os.path.exists(os.path.join(memory_cgroup.dir, 'memory.pressure'))
            pressure = cgroup_file(memory_cgroup, 'memory.pressure') if has_pressure else {}
        sender = subprocess.run([sys.executable, '-c', KILLER, killer, str(victim.pid), str(int(sig))], check=True)
        assert sender.returncode == 0
        assert victim.wait(timeout=30) == -sig
        [kill] = [k for k in signal_records(probe, victim.pid) if k.victim_pid == victim.pid]
    finally:
        victim.kill()
        victim.wait()
    assert kill.signal is not None and kill.signal.number == sig
    assert kill.trigger_comm == killer[: record.COMM_LEN - 1]
    assert kill.victim_comm == 'mk-victim'
    assert kill.cgroup_path == memory_cgroup.path
    memory = kill.signal.cgroup_memory
    assert memory is not None
    assert memory.limit_kb == limit_kb
    assert abs(memory.usage_kb - usage_kb) <= CHARGE_BATCH_PAGES * record.PAGE_KB, (memory.usage_kb, usage_kb)
    if memory_cgroup.version == 2:  # what the kernel read at the signal, as its files showed it just before
        assert {name: int(count) for name, count in events.items()} == {name: memory.events[name] for name in events}
    if memory_cgroup.version == 2 and pressure:
        # The 10 s averages move every 2 s: an idle victim's stay where they were, up to rounding.
        assert abs(memory.pressure_some_avg10 - pressure_avg10(pressure['some'])) <= 0.5
        assert abs(memory.pressure_full_avg10 - pressure_avg10(pressure['full'])) <= 0.5
    # Made a kill: the victim is gone, so a SIGTERM did it.
    out = SignalKills(DEFAULT_MEMORY_KILLERS).sort([kill], time.monotonic())
    assert [k.victim_pid for k in out.kills] == [victim.pid] and out.survived == []


def test_an_ordinary_kill_is_not_recorded(probe, memory_cgroup):
    victim = memory_cgroup.start('plain-victim', alloc_mb=8, mode='hold')
    try:
        assert victim.stdout.readline() == b'ready\n'
        probe.get_and_flush()
        subprocess.run(['sh', '-c', f'kill -9 {victim.pid}'], check=True)  # a shell's kill (procps may be absent)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        # A marker kill by a memory killer after it: once that one is in, the plain one would be too.
        marker = memory_cgroup.start('marker', alloc_mb=1, mode='hold')
        assert marker.stdout.readline() == b'ready\n'
        subprocess.run([sys.executable, '-c', KILLER, 'earlyoom', str(marker.pid), '9'], check=True)
        marker.wait(timeout=30)
        records = signal_records(probe, marker.pid)
    finally:
        victim.kill()
        victim.wait()
    assert [k.victim_comm for k in records] == ['marker']  # the kill -9 before it left no record


# Joins the cgroup, catches SIGTERM (a process that cleans up and carries on, as many do), waits.
STUBBORN = """
import ctypes, signal, sys, time
ctypes.CDLL(None).prctl(15, b'stubborn', 0, 0, 0)
with open(sys.argv[1], 'w') as f:
    f.write('0')
signal.signal(signal.SIGTERM, lambda *_: print('sigterm', flush=True))
blob = bytearray(4 * 1024 * 1024)
print('ready', flush=True)
while True:
    time.sleep(3600)
"""


def stubborn(memory_cgroup) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, '-c', STUBBORN, os.path.join(memory_cgroup.dir, 'cgroup.procs')],
        stdout=subprocess.PIPE,
        text=True,
    )
    read_until(proc.stdout, 'ready')
    return proc


def send(killer: str, pid: int, sig: int) -> None:
    subprocess.run([sys.executable, '-c', KILLER, killer, str(pid), str(int(sig))], check=True)


@pytest.mark.parametrize(
    'variant_options',
    [
        pytest.param({'enable_core': True, 'allow_runtime_compiled_fallback': False}, id='co-re'),
        pytest.param({'enable_core': False}, id='bcc', marks=pytest.mark.bcc),
    ],
)
def test_a_memory_killers_sigterm_then_sigkill_is_one_kill_in_the_check_as_users_see_it(
    dd_run_check, aggregator, instance, memory_cgroup, variant_options
):
    from datadog_checks.ebpf_probe import EbpfProbeCheck

    check = EbpfProbeCheck('ebpf_probe', {}, [{**instance, **variant_options, 'collect_ebpf_stats': False}])
    try:
        dd_run_check(check)
        probe = check._oom_kill.probe
        assert (
            probe.signal_hook
            == {'co-re': 'tp_btf/signal_generate', 'bcc': 'raw_tracepoint/signal_generate'}[probe.variant]
        ), probe.limitations
        aggregator.reset()
        victim = stubborn(memory_cgroup)
        try:
            send('earlyoom', victim.pid, signal.SIGTERM)
            read_until(victim.stdout, 'sigterm')  # it took the SIGTERM and carried on
            dd_run_check(check)  # the SIGTERM alone: held, no kill yet
            assert aggregator.metrics('ebpf_probe.oom_kill.count') == [] and aggregator.events == []
            send('earlyoom', victim.pid, signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
        finally:
            victim.kill()
            victim.wait()
        dd_run_check(check)
        tags = [
            'process_name:stubborn',
            f'cgroup_name:{memory_cgroup.name}',
            'killer:earlyoom',
            'killer_type:memory_killer',
            'signal:SIGKILL',
            *instance['tags'],
        ]
        aggregator.assert_metric('ebpf_probe.oom_kill.count', value=1, count=1, tags=tags)
        aggregator.assert_metric('ebpf_probe.oom_kill.unaccounted', value=0, count=1)  # not the kernel's kill
        assert aggregator.metrics('ebpf_probe.container_kill.count') == []  # no container of its own
        [event] = aggregator.events
        assert event['msg_title'] == f'Memory kill by earlyoom: stubborn (pid {victim.pid})'
        assert sorted(event['tags']) == sorted(tags)
        text = event['msg_text']
        assert 'was killed by the memory killer **earlyoom**' in text
        assert '| Signals | SIGTERM, then SIGKILL (the process was still there) |' in text
        assert f'| Memory cgroup | /{memory_cgroup.name.replace("-", chr(92) + "-")} |' in text
        assert ' of a 32,768 kB limit, when the signal was sent |' in text
    finally:
        check.cancel()


def test_a_sigterm_the_process_outlives_is_a_warning_not_a_kill(
    dd_run_check, aggregator, instance, memory_cgroup, monkeypatch
):
    from datadog_checks.ebpf_probe import EbpfProbeCheck
    from datadog_checks.ebpf_probe.oom_kill import user_space

    monkeypatch.setattr(user_space, 'SIGTERM_GRACE_SECONDS', 0.5)  # not a minute
    check = EbpfProbeCheck('ebpf_probe', {}, [{**instance, 'collect_ebpf_stats': False}])
    try:
        dd_run_check(check)
        aggregator.reset()
        victim = stubborn(memory_cgroup)
        try:
            send('nohang', victim.pid, signal.SIGTERM)
            read_until(victim.stdout, 'sigterm')
            dd_run_check(check)
            time.sleep(0.6)
            dd_run_check(check)
            assert victim.poll() is None  # still running
        finally:
            victim.kill()
            victim.wait()
        assert aggregator.metrics('ebpf_probe.oom_kill.count') == []
        [event] = aggregator.events
        assert event['alert_type'] == 'warning'
        assert event['msg_title'] == f'stubborn (pid {victim.pid}) survived a SIGTERM from nohang'
    finally:
        check.cancel()


@pytest.mark.container_runtime
@pytest.mark.parametrize('how', ['podman stop -t 0', 'podman kill'])
def test_a_container_stopped_with_sigkill_is_explained_with_its_runtime(dd_run_check, aggregator, how):
    """podman with crun (one VM row): the container's main process killed with SIGKILL, exit 137, and
    who sent it, as the check reports it; one kill, counted as a container's, not as a memory kill."""
    from datadog_checks.ebpf_probe import EbpfProbeCheck
    from datadog_checks.ebpf_probe.oom_kill.user_space import CONTAINER_RUNTIMES

    from .containers_runtime import podman, start_container

    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    try:
        dd_run_check(check)
        aggregator.reset()
        with start_container(command='exec sleep 3600') as container:
            podman(*how.split()[1:], container.id)
            podman('wait', container.id)
            assert container.outcome().exit_code == 137
            dd_run_check(check)
        assert aggregator.metrics('ebpf_probe.oom_kill.count') == []  # not a memory kill
        [point] = aggregator.metrics('ebpf_probe.container_kill.count')
        tags = dict(t.split(':', 1) for t in point.tags)
        assert tags['killer_type'] == 'container_runtime' and tags['killer'] in CONTAINER_RUNTIMES, tags
        assert tags['container_main_process'] == 'true' and tags['signal'] == 'SIGKILL'
        [event] = aggregator.events
        assert event['msg_title'] == (
            f"Container's main process killed by {tags['killer']} (SIGKILL, exit 137): sleep (pid {container.pid})"
        )
        assert 'the container stopped with exit code 137, and no OOM kill was involved' in event['msg_text']
        assert "the pod's Kubernetes events tell which" in event['msg_text']
    finally:
        check.cancel()


@pytest.mark.container_runtime
def test_a_container_the_kernel_oom_killed_is_one_kill_by_the_kernel(dd_run_check, aggregator):
    """The kernel's OOM killer sends its SIGKILL itself: one kill, killer:kernel, counted as the
    container's stop too, and no second report from the signal."""
    from datadog_checks.ebpf_probe import EbpfProbeCheck

    from .containers_runtime import start_container

    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    try:
        dd_run_check(check)
        aggregator.reset()
        with start_container(memory='20m') as container:
            assert container.allocate().exit_code == 137
            dd_run_check(check)
        [event] = aggregator.events
        assert event['msg_title'] == f'OOM kill: dd (pid {container.pid})'
        for metric in ('ebpf_probe.oom_kill.count', 'ebpf_probe.container_kill.count'):
            [point] = aggregator.metrics(metric)
            assert 'killer:kernel' in point.tags and 'killer_type:kernel' in point.tags
    finally:
        check.cancel()


# Allocates 16 MB at a time, slowly enough for a memory killer polling every 100 ms to act first.
HOG = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b'hog', 0, 0, 0)
blocks = []
print('ready', flush=True)
while True:
    blocks.append(bytearray(16 * 1024 * 1024))
    time.sleep(0.05)
"""


@pytest.mark.system_oom
@pytest.mark.memory_killer
def test_the_real_earlyoom_killing_for_memory_is_a_memory_kill(dd_run_check, aggregator):
    """Debian's earlyoom (one VM row, whose memory a process may fill): it kills the process with the
    most memory when the machine's available memory falls below 10%, with SIGTERM first."""
    from datadog_checks.ebpf_probe import EbpfProbeCheck

    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    earlyoom = subprocess.Popen(['earlyoom', '-m', '10', '-s', '100', '-r', '0', '--prefer', '^hog$'],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        dd_run_check(check)
        aggregator.reset()
        hog = subprocess.Popen([sys.executable, '-c', HOG], stdout=subprocess.PIPE, text=True)
        read_until(hog.stdout, 'ready')
        assert hog.wait(timeout=300) in (-signal.SIGTERM, -signal.SIGKILL)
        dd_run_check(check)
        [point] = aggregator.metrics('ebpf_probe.oom_kill.count')
        assert {'killer:earlyoom', 'killer_type:memory_killer', 'process_name:hog'} <= set(point.tags)
        [event] = aggregator.events
        assert event['msg_title'] == f'Memory kill by earlyoom: hog (pid {hog.pid})'
        assert f'**earlyoom** (pid {earlyoom.pid})' in event['msg_text']
        aggregator.assert_metric('ebpf_probe.oom_kill.unaccounted', value=0)  # the kernel killed nothing
    finally:
        earlyoom.kill()
        earlyoom.wait()
        check.cancel()


def test_the_memory_controllers_cgroup_version_is_the_one_the_tests_cgroups_are_made_in(memory_cgroup):
    from datadog_checks.ebpf_probe.kernel import features

    assert features.memory_cgroup_v2() is (memory_cgroup.version == 2)
