# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Kill signals from user space made into kills: one per victim, SIGTERMs held until their outcome
is known (pure logic: the records and the victims' liveness are made up; the real kernel's are in
test_user_space_kills_kernel.py)."""

import pytest

from datadog_checks.ebpf_probe.oom_kill import record, user_space
from datadog_checks.ebpf_probe.oom_kill.record import KillSignal, OOMKill, Parent
from datadog_checks.ebpf_probe.oom_kill.user_space import SignalKills

pytestmark = pytest.mark.unit

START = 5_000_000_000  # the victims' start time, ns since boot


def signal_record(number: int, killer: str = 'earlyoom', pid: int = 300, at: float = 100.0, **overrides) -> OOMKill:
    fields = {
        'timestamp': at,
        'victim_pid': pid,
        'victim_tid': pid,
        'victim_comm': 'app',
        'victim_uid': 0,
        'oom_score_adj': 0,
        'trigger_pid': 99,
        'trigger_tid': 99,
        'trigger_comm': killer,
        'memcg_oom': None,
        'cgroup_path': '/app',
        'cgroup_id': 7,
        'cgroup_path_truncated': False,
        'memory': None,
        'oom_domain_pages': None,
        'badness_points': None,
        'hook': 'tp_btf/signal_generate',
        'signal': KillSignal(number, START, None),
    }
    fields.update(overrides)
    return OOMKill(**fields)


def in_container(kill: OOMKill, ns_pid: int, parent_comm: str = 'tini', oldest: bool = True) -> OOMKill:
    """The victim as pid ns_pid of a container's pid namespace, its parent that namespace's pid 1."""
    parent = None if ns_pid == 1 else Parent(pid=200, comm=parent_comm, ns_pid=1, oldest_child=oldest)
    return OOMKill(**{**kill.__dict__, 'ns_pid': ns_pid, 'pid_ns_level': 1, 'parent': parent})


class Liveness:
    def __init__(self, alive: set[int]):
        self.alive = alive

    def __call__(self, pid: int, start_time: int) -> bool | None:
        assert start_time == START
        return pid in self.alive


def kills_of(out: user_space.UserSpaceKills) -> list[tuple[int, int, bool]]:
    return [(k.victim_pid, k.signal.number, k.signal.after_sigterm) for k in out.kills]


def test_a_sigterm_then_a_sigkill_from_the_same_killer_is_one_kill_that_took_both():
    kills = SignalKills(('earlyoom',), Liveness({300}))
    first = kills.sort([signal_record(record.SIGTERM, at=100.0)], now=0.0)
    assert first.kills == [] and first.survived == []  # held: its outcome is not known yet
    second = kills.sort([signal_record(record.SIGKILL, at=103.0)], now=15.0)
    assert kills_of(second) == [(300, record.SIGKILL, True)]
    assert kills.sort([], now=200.0).survived == []  # nothing left held


def test_a_sigterm_the_victim_died_of_is_a_kill_by_sigterm():
    kills = SignalKills(('earlyoom',), Liveness(set()))
    assert kills_of(kills.sort([signal_record(record.SIGTERM)], now=0.0)) == [(300, record.SIGTERM, False)]


def test_a_sigterm_outlived_is_a_warning_not_a_kill():
    kills = SignalKills(('earlyoom',), Liveness({300}), grace=60)
    assert kills.sort([signal_record(record.SIGTERM)], now=0.0).kills == []
    assert kills.sort([], now=30.0).survived == []
    out = kills.sort([], now=61.0)
    assert out.kills == [] and [k.victim_pid for k in out.survived] == [300]
    assert kills.sort([], now=200.0).survived == []  # said once


def test_signals_from_two_killers_are_not_merged():
    kills = SignalKills(('earlyoom', 'nohang'), Liveness({300}))
    kills.sort([signal_record(record.SIGTERM, killer='nohang')], now=0.0)
    out = kills.sort([signal_record(record.SIGKILL, killer='earlyoom')], now=1.0)
    assert kills_of(out) == [(300, record.SIGKILL, False)]


def test_a_sigkill_ends_a_container_only_through_its_main_process():
    kills = SignalKills(('earlyoom',), Liveness(set()))
    main = in_container(signal_record(record.SIGKILL, killer='crun', pid=301), ns_pid=1)
    under_tini = in_container(signal_record(record.SIGKILL, killer='runc', pid=302), ns_pid=2)
    worker = in_container(signal_record(record.SIGKILL, killer='crun', pid=303), ns_pid=7, parent_comm='sh')
    shell_child = in_container(signal_record(record.SIGKILL, killer='bash', pid=304), ns_pid=2, parent_comm='sh')
    out = kills.sort([main, under_tini, worker, shell_child], now=0.0)
    assert [k.victim_pid for k in out.kills] == [301, 302]  # a worker's death, or one not known to end it: none


@pytest.mark.parametrize(
    'killer, expected',
    [
        ('earlyoom', user_space.MEMORY_KILLER),
        ('crun', user_space.CONTAINER_RUNTIME),
        ('containerd-shim', user_space.CONTAINER_RUNTIME),
        ('bash', user_space.OTHER),
    ],
)
def test_killers_are_classed_by_name(killer, expected):
    kill = signal_record(record.SIGKILL, killer=killer)
    assert user_space.killer_type(kill, frozenset({'earlyoom'})) == expected
    assert user_space.killer_name(kill) == killer


@pytest.mark.parametrize(
    'comm, name',
    [('memfd:crun_clon', 'crun'), ('memfd:runc_clon', 'runc'), ('runc:[2:INIT]', 'runc'), ('crun', 'crun')],
)
def test_a_runtime_that_runs_from_a_sealed_copy_or_names_its_stages_is_known_by_its_name(comm, name):
    # crun's kill, seen in the 6.12 row: it re-executes itself from a memfd copy, named memfd:crun_clone.
    kill = signal_record(record.SIGKILL, killer=comm)
    assert user_space.killer_type(kill, frozenset()) == user_space.CONTAINER_RUNTIME
    assert user_space.killer_name(kill) == name


def test_a_name_like_a_runtimes_but_not_one_is_another_process():
    kill = signal_record(record.SIGKILL, killer='memfd:evil_clon')
    assert user_space.killer_type(kill, frozenset()) == user_space.OTHER
    assert user_space.killer_name(kill) == 'memfd:evil_clon'


def test_the_kernels_kills_are_the_kernels():
    kill = OOMKill(**{**signal_record(record.SIGKILL).__dict__, 'signal': None})
    assert user_space.killer_type(kill, frozenset()) == user_space.KERNEL
    assert user_space.killer_name(kill) == 'kernel'


def test_a_memory_killers_name_is_matched_as_the_kernel_keeps_names():
    long_name = 'a-memory-killer-with-a-long-name'
    kills = SignalKills((long_name,), Liveness(set()))
    out = kills.sort([signal_record(record.SIGKILL, killer=long_name[:15])], now=0.0)
    assert len(out.kills) == 1


def test_liveness_is_the_process_with_that_start_time(tmp_path):
    """/proc/PID/stat's starttime is in clock ticks: this process is alive, with its own start time."""
    import os

    with open(f'/proc/{os.getpid()}/stat', 'rb') as f:
        stat = f.read()
    ticks = int(stat[stat.rfind(b')') + 2 :].split()[19])
    start_ns = ticks * 1_000_000_000 // os.sysconf('SC_CLK_TCK')
    assert user_space.still_running(os.getpid(), start_ns)
    assert not user_space.still_running(os.getpid(), start_ns + 10_000_000_000)  # another process's pid reused
    assert user_space.still_running(2**22 + 1, start_ns) is False  # no such pid


def test_where_the_hosts_processes_are_not_seen_a_sigterms_outcome_is_not_known_and_not_a_kill():
    kills = SignalKills(('earlyoom',), alive=lambda pid, start: None, grace=60)
    assert kills.sort([signal_record(record.SIGTERM)], now=0.0) == user_space.UserSpaceKills()
    out = kills.sort([], now=61.0)
    assert out.kills == [] and out.survived == [] and [k.victim_pid for k in out.outcome_unknown] == [300]
    # A SIGKILL after it is a kill all the same: SIGKILL cannot be survived.
    kills.sort([signal_record(record.SIGTERM, pid=301)], now=100.0)
    out = kills.sort([signal_record(record.SIGKILL, pid=301)], now=101.0)
    assert kills_of(out) == [(301, record.SIGKILL, True)]
