# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What keeps a run's cost bounded, as logic: owner scans only on change, statistics windows and their
scaling, kprobe misses from link info, the iterators' records. No BPF programs are loaded here."""

import logging
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

from datadog_checks.ebpf_probe.ebpf_stats import inventory, links, owners, runtime
from datadog_checks.ebpf_probe.ebpf_stats.metrics import COUNT, MetricOptions, StatsMetrics
from datadog_checks.ebpf_probe.ebpf_stats.owners import OWNED_LINK, OWNED_MAP, OWNED_PROG, HolderWatch, OwnerTracker
from datadog_checks.ebpf_probe.ebpf_stats.records import EbpfSnapshot, Owner, ProgramRecord, RunTimeCoverage
from datadog_checks.ebpf_probe.kernel import libbpf

pytestmark = pytest.mark.unit

log = logging.getLogger('test')
# Holders must be live processes: exited ones are noticed (and looked for again).
TOOL = Owner(1, 'tool')
AGENT = Owner(os.getppid(), 'agent')


# --- Owners ---------------------------------------------------------------------------------------------


class FakeScan:
    """The fd walk, counted: records as the task_file iterator gives them."""

    def __init__(self, records):
        self.records = records
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return list(self.records)


def tracker(records, own_pid=999):
    scan = FakeScan(records)
    return OwnerTracker(scan, own_pid, log), scan


def objects(*keys):
    """kind -> ids, as the probe gives them."""
    ids = {OWNED_PROG: set(), OWNED_MAP: set(), OWNED_LINK: set()}
    for kind, object_id in keys:
        ids[kind].add(object_id)
    return ids


def refs(*items):
    """kind -> id -> references."""
    result = {OWNED_PROG: {}, OWNED_MAP: {}}
    for (kind, object_id), count in items:
        result[kind][object_id] = count
    return result


def held(holders, key):
    return holders.get(key[0], {}).get(key[1])


MAP_1, PROG_2, LINK_3 = (OWNED_MAP, 1), (OWNED_PROG, 2), (OWNED_LINK, 3)


def test_owners_are_found_by_one_scan_and_kept_while_nothing_changes():
    track, scan = tracker([(TOOL.pid, OWNED_MAP, 1, 0, 'tool', 0)])
    try:
        for _ in range(5):
            holders, _pinned = track.owners(objects(MAP_1, PROG_2), refs((MAP_1, 2), (PROG_2, 1)))
            assert held(holders, MAP_1) == (TOOL,)
            assert held(holders, PROG_2) is None
        assert scan.calls == 1
    finally:
        track.close()


def test_a_new_object_is_looked_for_at_once():
    track, scan = tracker([(TOOL.pid, OWNED_MAP, 1, 0, 'tool', 0)])
    try:
        track.owners(objects(MAP_1), {})
        scan.records.append((AGENT.pid, OWNED_MAP, 4, 0, 'agent', 0))
        holders, _ = track.owners(objects(MAP_1, (OWNED_MAP, 4)), {})
        assert held(holders, (OWNED_MAP, 4)) == (AGENT,)
        assert scan.calls == 2
        track.owners(objects(MAP_1), {})  # one going away changes nobody's holders
        assert scan.calls == 2
    finally:
        track.close()


def test_a_new_link_is_looked_for_and_holding_it_holds_its_program():
    track, scan = tracker([])
    try:
        track.owners(objects(PROG_2), {})
        scan.records.append((TOOL.pid, OWNED_LINK, 3, 2, 'tool', 0))
        holders, _ = track.owners(objects(PROG_2, LINK_3), {})
        assert held(holders, PROG_2) == (TOOL,) and held(holders, LINK_3) == (TOOL,)
    finally:
        track.close()


def test_a_reference_count_that_moves_means_holders_may_have_changed():
    track, scan = tracker([(TOOL.pid, OWNED_MAP, 1, 0, 'tool', 0)])
    try:
        track.owners(objects(MAP_1), refs((MAP_1, 2)))
        track.owners(objects(MAP_1), refs((MAP_1, 2)))
        assert scan.calls == 1
        scan.records = [(AGENT.pid, OWNED_MAP, 1, 0, 'agent', 0)]  # the tool closed its fd, the agent opened one
        holders, _ = track.owners(objects(MAP_1), refs((MAP_1, 3)))
        assert held(holders, MAP_1) == (AGENT,) and scan.calls == 2
    finally:
        track.close()


def test_equal_holder_sets_share_one_tuple():
    track, _ = tracker(
        [
            (TOOL.pid, OWNED_MAP, 1, 0, 'tool', 0),
            (TOOL.pid, OWNED_MAP, 5, 0, 'tool', 0),
            (TOOL.pid, OWNED_PROG, 2, 0, 'tool', 0),
        ]
    )
    try:
        holders, _ = track.owners(objects(MAP_1, (OWNED_MAP, 5), PROG_2), {})
        assert held(holders, MAP_1) is held(holders, (OWNED_MAP, 5)) is held(holders, PROG_2)
    finally:
        track.close()


def sleeper(comm='sleeper'):
    return subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])


def test_a_holder_that_exits_is_noticed_and_its_process_looked_for_again():
    proc = sleeper()
    try:
        track, scan = tracker([(proc.pid, OWNED_MAP, 1, 0, 'sleeper', 0)])
        track.owners(objects(MAP_1), {})
        track.owners(objects(MAP_1), {})
        assert scan.calls == 1
        proc.kill()
        proc.wait()
        scan.records = []
        holders, _ = track.owners(objects(MAP_1), {})
        assert scan.calls == 2 and held(holders, MAP_1) is None
        track.owners(objects(MAP_1), {})
        assert scan.calls == 2  # nobody left to watch
        track.close()
    finally:
        proc.kill()
        proc.wait()


def test_the_check_itself_is_not_watched():
    track, scan = tracker([(os.getpid(), OWNED_MAP, 1, 0, 'me', 0)], own_pid=os.getpid())
    try:
        track.owners(objects(MAP_1), {})
        assert track._watch._pidfds == {} and track._watch._pids == set()
    finally:
        track.close()


def test_a_holder_watch_closes_its_pidfds():
    procs = [sleeper() for _ in range(3)]
    fds_before = set(os.listdir('/proc/self/fd'))
    watch = HolderWatch()
    try:
        watch.watch(p.pid for p in procs)
        assert len(watch._pidfds) == 3 and not watch.exited()
        watch.watch([procs[0].pid])  # the others are no longer holders: their pidfds are closed
        assert list(watch._pidfds) == [procs[0].pid]
        procs[0].kill()
        procs[0].wait()
        assert watch.exited()
    finally:
        watch.close()
        for p in procs:
            p.kill()
            p.wait()
    assert set(os.listdir('/proc/self/fd')) == fds_before


def test_beyond_the_pidfd_limit_holders_are_watched_by_pid(monkeypatch):
    monkeypatch.setattr(owners, 'MAX_WATCHED_HOLDERS', 1)
    procs = [sleeper() for _ in range(2)]
    watch = HolderWatch()
    try:
        watch.watch(p.pid for p in procs)
        assert len(watch._pidfds) == 1 and len(watch._pids) == 1
        [by_pid] = watch._pids
        [p for p in procs if p.pid == by_pid][0].kill()
        [p for p in procs if p.pid == by_pid][0].wait()
        assert watch.exited()
    finally:
        watch.close()
        for p in procs:
            p.kill()
            p.wait()


# --- Run-time statistics windows ------------------------------------------------------------------------


class FakeKernel:
    """Program counters that advance only while a (fake) BPF_ENABLE_STATS fd is open, or while `external`."""

    def __init__(self, monkeypatch, runs_per_second=1000.0):
        self.open_fds: set[int] = set()
        self.opened = 0  # windows opened
        self.external = False
        self.enabled_seconds = 0.0
        self._since: float | None = None
        self._rate = runs_per_second
        self._lock = threading.Lock()
        monkeypatch.setattr(runtime, 'enable_stats', self.enable_stats)

    def enable_stats(self, stats_type=0):
        read_end, write_end = os.pipe()
        os.close(write_end)
        with self._lock:
            self._account()
            self.opened += 1
            self.open_fds.add(read_end)
        return read_end

    def closed(self, fd):
        with self._lock:
            self._account()
            self.open_fds.discard(fd)

    def _on(self) -> bool:
        return bool(self.open_fds) or self.external

    def _account(self):
        now = time.monotonic()
        if self._since is not None and self._on():
            self.enabled_seconds += now - self._since
        self._since = now

    def counters(self):
        with self._lock:
            self.open_fds = {fd for fd in self.open_fds if _fd_open(fd)}
            self._account()
            runs = int(self.enabled_seconds * self._rate)
            return {7: (runs * 100, runs)}


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def sampler(kernel, fraction=0.2, interval=0.5):
    return runtime.RunTimeSampler(fraction, interval, kernel.counters, log, sysctl_on=lambda: False)


def observe(s, kernel):
    return s.observe(lambda: (None, kernel.counters()))[1]


def test_one_window_per_interval_and_its_share_of_the_interval(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    s = sampler(kernel, fraction=0.2, interval=0.5)
    try:
        assert observe(s, kernel) is None  # the first snapshot: no interval yet
        time.sleep(0.5)
        coverage = observe(s, kernel)
        assert coverage.source == 'sampled'
        assert coverage.fraction == pytest.approx(0.2, abs=0.05)  # the first window: 0.1 s, at once
        assert coverage.scale == pytest.approx(5, rel=0.3)
        assert kernel.opened == 1
    finally:
        s.close()
    assert not kernel.open_fds or not any(_fd_open(fd) for fd in kernel.open_fds)


def test_no_window_without_snapshots(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    s = sampler(kernel, fraction=0.1, interval=0.2)
    try:
        observe(s, kernel)
        time.sleep(0.6)  # three intervals' worth, but no snapshot to schedule more windows
        assert kernel.opened == 1
    finally:
        s.close()


def test_counters_that_move_between_windows_mean_someone_else_has_statistics_on(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    s = sampler(kernel, fraction=0.1, interval=0.5)
    try:
        observe(s, kernel)
        time.sleep(0.2)  # our window (0.05 s) is over
        kernel.external = True
        time.sleep(0.1)
        coverage = observe(s, kernel)
        assert coverage.source == 'external' and coverage.scale == 1.0
        kernel.external = False
        time.sleep(0.5)
        assert observe(s, kernel).source == 'sampled'  # back to our own windows
    finally:
        s.close()


def test_with_the_sysctl_on_no_window_is_opened_and_nothing_is_scaled(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    s = runtime.RunTimeSampler(0.1, 0.2, kernel.counters, log, sysctl_on=lambda: True)
    try:
        observe(s, kernel)
        time.sleep(0.2)
        assert observe(s, kernel) == RunTimeCoverage(None, 'sysctl')
        assert kernel.opened == 0  # statistics are on for everyone already: no tax of ours on top
    finally:
        s.close()


def test_closing_stops_the_thread_and_closes_an_open_window(monkeypatch):
    kernel = FakeKernel(monkeypatch)
    s = sampler(kernel, fraction=0.9, interval=10)  # a 9 s window, open when close() comes
    observe(s, kernel)
    deadline = time.monotonic() + 5
    while kernel.opened < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    [fd] = kernel.open_fds
    started = time.monotonic()
    s.close()
    assert time.monotonic() - started < 1
    assert not _fd_open(fd)
    assert not s._thread.is_alive()


def test_a_refused_window_stops_sampling_and_says_why(monkeypatch, caplog):
    def refuse(stats_type=0):
        raise libbpf.LibbpfError('bpf_enable_stats', 1)

    monkeypatch.setattr(runtime, 'enable_stats', refuse)
    s = runtime.RunTimeSampler(0.1, 0.2, dict, log, sysctl_on=lambda: False)
    try:
        s.observe(lambda: (None, {}))
        s._thread.join(timeout=5)
        assert 'Operation not permitted' in s.error
    finally:
        s.close()


@pytest.mark.parametrize('fraction', [0, 1, 1.5])
def test_a_sampler_samples(fraction):
    with pytest.raises(ValueError):
        runtime.RunTimeSampler(fraction, 1, dict, log)


def test_moved_compares_programs_present_in_both_reads():
    assert not runtime.moved({1: (10, 1)}, {1: (10, 1), 2: (99, 9)})  # a new program: nothing to compare
    assert runtime.moved({1: (10, 1)}, {1: (11, 1)})
    assert not runtime.moved({1: (10, 1), 3: (5, 5)}, {1: (10, 1)})  # one gone


def test_the_sysctl_is_read_not_written(tmp_path):
    sysctl = tmp_path / 'bpf_stats_enabled'
    sysctl.write_text('1\n')
    assert runtime.stats_sysctl_on(str(sysctl))
    sysctl.write_text('0\n')
    assert not runtime.stats_sysctl_on(str(sysctl))
    assert not runtime.stats_sysctl_on(str(tmp_path / 'missing'))


@pytest.mark.parametrize(
    'coverage, scale',
    [
        (RunTimeCoverage(None, 'held'), 1.0),
        (RunTimeCoverage(None, 'external'), 1.0),
        (RunTimeCoverage(0.05, 'sampled'), 20.0),
        (RunTimeCoverage(1.0, 'sampled'), 1.0),
        (RunTimeCoverage(0.0, 'sampled'), None),
    ],
)
def test_coverage_scale(coverage, scale):
    assert coverage.scale == (pytest.approx(scale) if scale else None)


# --- Metrics: scaled run time, raw misses -------------------------------------------------------------------


def program(id, run_time_ns=0, run_count=0, recursion_misses=0, kprobe_misses=None):
    return ProgramRecord(id, 'p', 'kprobe', 'aa', 8, 8, 1, 4096, run_time_ns, run_count, recursion_misses, (),
                         (TOOL,), False, kprobe_misses)  # fmt: skip


def two_snapshots(first, second, coverage, interval=10.0):
    metrics = StatsMetrics(MetricOptions(own_pid=1))
    metrics.points(EbpfSnapshot(0.0, [first], [], coverage))
    return {p.metric: p.value for p in metrics.points(EbpfSnapshot(interval, [second], [], coverage))}


def test_sampled_run_time_and_runs_are_scaled_to_the_interval_misses_are_not():
    points = two_snapshots(
        program(1, 1_000, 10, 1, kprobe_misses=5),
        program(1, 1_000 + 50_000, 10 + 100, 4, kprobe_misses=9),
        RunTimeCoverage(0.05, 'sampled'),
    )
    assert points['program.run_count'] == 2_000  # 100 runs counted in 5% of the interval
    assert points['program.run_time'] == 1_000_000
    assert points['program.average_run_time'] == 500.0  # the same, scaled or not
    assert points['program.cpu_usage'] == pytest.approx(100 * 1_000_000 / 10e9)
    assert points['program.recursion_misses'] == 3  # the kernel counts misses all the time
    assert points['program.kprobe_misses'] == 4


def test_nothing_counted_gives_no_run_time_but_kprobe_misses_still():
    points = two_snapshots(program(1, kprobe_misses=0), program(1, kprobe_misses=2), RunTimeCoverage(0.0, 'sampled'))
    assert 'program.run_count' not in points and 'program.cpu_usage' not in points
    assert points['program.kprobe_misses'] == 2


def test_no_kprobe_misses_for_programs_without_kprobe_links():
    points = two_snapshots(program(1), program(1, 10, 1), RunTimeCoverage(None, 'held'))
    assert 'program.kprobe_misses' not in points
    assert points['program.run_count'] == 1


def test_kprobe_misses_are_counts():
    metrics = StatsMetrics(MetricOptions(own_pid=1))
    metrics.points(EbpfSnapshot(0.0, [program(1, kprobe_misses=1)], [], None))
    [point] = [p for p in metrics.points(EbpfSnapshot(1.0, [program(1, kprobe_misses=3)], [], None))
               if p.metric == 'program.kprobe_misses']  # fmt: skip
    assert point.type == COUNT and point.value == 2


# --- kprobe misses from bpf_link_info -----------------------------------------------------------------------


def link_info(link_type, link_id=3, prog_id=9, union=b''):
    return struct.pack('<IIII', link_type, link_id, prog_id, 0) + union.ljust(112, b'\0')


def test_a_kprobe_multi_link_says_its_misses():
    union = struct.pack('<QIIQ', 0, 4, 0, 17)  # addrs, count, flags, missed
    info = links.decode_link_info(link_info(links.BPF_LINK_TYPE_KPROBE_MULTI, union=union), with_missed=True)
    assert (info.kprobe, info.missed, info.prog_id, info.id) == (True, 17, 9, 3)


@pytest.mark.parametrize('perf_type', [links.BPF_PERF_EVENT_KPROBE, links.BPF_PERF_EVENT_KRETPROBE])
def test_a_kprobe_perf_event_link_says_its_misses(perf_type):
    # perf_event: type, pad, then kprobe: func_name, name_len, offset, addr, missed
    union = struct.pack('<IIQIIQQ', perf_type, 0, 0xDEAD, 512, 0, 0xFFFF0000, 42)
    info = links.decode_link_info(link_info(links.BPF_LINK_TYPE_PERF_EVENT, union=union), with_missed=True)
    assert (info.kprobe, info.missed) == (True, 42)


def test_other_links_and_kernels_without_the_field_give_no_misses():
    tracepoint = struct.pack('<II', 5, 0) + struct.pack('<Q', 99) * 5  # BPF_PERF_EVENT_TRACEPOINT
    info = links.decode_link_info(link_info(links.BPF_LINK_TYPE_PERF_EVENT, union=tracepoint), with_missed=True)
    assert (info.kprobe, info.missed) == (False, None)
    union = struct.pack('<QIIQ', 0, 4, 0, 17)
    info = links.decode_link_info(link_info(links.BPF_LINK_TYPE_KPROBE_MULTI, union=union), with_missed=False)
    assert (info.kprobe, info.missed) == (True, None)
    info = links.decode_link_info(link_info(4), with_missed=True)  # an iterator link
    assert (info.kprobe, info.missed) == (False, None)


class FakeBtf:
    def __init__(self, members):
        self.members = members

    def member_path(self, struct_name, path):
        assert struct_name == 'bpf_link_info'
        if path not in self.members:
            raise LookupError(path)
        return self.members[path], 0


def test_the_missed_fields_are_looked_for_in_the_kernels_btf():
    assert links.kernel_counts_kprobe_misses(FakeBtf(dict(links.MISSED_FIELDS)))
    assert not links.kernel_counts_kprobe_misses(FakeBtf({'kprobe_multi.missed': 32}))  # 6.6: neither, here one
    assert not links.kernel_counts_kprobe_misses(FakeBtf({}))
    moved = {**links.MISSED_FIELDS, 'kprobe_multi.missed': 40}
    assert not links.kernel_counts_kprobe_misses(FakeBtf(moved))  # not where this code reads it


# --- The iterators' records ----------------------------------------------------------------------------------


def prog_record(prog_id, map_ids=(), flags=inventory.PROG_RUN_STATS):
    fields = (prog_id, 1, b'\x01' * 8, b'name'.ljust(16, b'\0'), 2, 30, 0, 1, 2, len(map_ids), 3, 400, 5, 0, flags, 0)
    return inventory.PROG_RECORD.pack(*fields) + struct.pack(f'<{len(map_ids)}I', *map_ids)


def test_program_records_with_their_map_ids():
    records = inventory.parse_programs(prog_record(1, (7, 8)) + prog_record(2) + prog_record(3, (9,)))
    assert [(r[0], r[-1]) for r in records] == [(1, (7, 8)), (2, ()), (3, (9,))]
    assert records[0][3] == b'name'.ljust(16, b'\0')


def test_a_cut_record_is_left_out():
    assert [r[0] for r in inventory.parse_programs(prog_record(1) + prog_record(2)[:40])] == [1]


def test_run_counters_only_when_the_iterator_could_read_them():
    ok = inventory.PROG_RUN_RECORD.pack(1, inventory.PROG_RUN_STATS, 500, 5)
    assert inventory.parse_run_counters(ok) == {1: (500, 5)}
    assert inventory.parse_run_counters(ok + inventory.PROG_RUN_RECORD.pack(2, 0, 0, 0)) is None


def test_memlock_from_fdinfo():
    read_end, write_end = os.pipe()
    try:
        assert inventory.memlock(read_end) is None  # a pipe has no memlock line
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize(
    'map_type, flags, fixed',
    [(1, 0, True), (1, inventory.BPF_F_NO_PREALLOC, False), (2, 0, True), (11, 0, False), (25, 0, False),
     (27, 0, True), (99, 0, False)],
)  # fmt: skip
def test_which_maps_keep_their_memory(map_type, flags, fixed):
    assert inventory.memory_is_fixed(map_type, flags) is fixed
