# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The eBPF stats probe against the real kernel, checked against bpftool."""

import errno
import logging
import os
import re
import signal
import struct
import threading
import time
import uuid

import pytest

from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe, Owner, inventory, links
from datadog_checks.ebpf_probe.ebpf_stats import probe as stats_probe
from datadog_checks.ebpf_probe.ebpf_stats.entries import LARGE_MAP, EntryCounter
from datadog_checks.ebpf_probe.ebpf_stats.owners import (
    bpffs_mounts,
    owner_records_from_iterator,
    owner_records_from_proc,
)
from datadog_checks.ebpf_probe.ebpf_stats.probe import ITERATORS, REFUSAL_COSTS, STATS_OBJECT
from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.kernel.btf import Btf
from datadog_checks.ebpf_probe.oom_kill.core import CORE_OBJECT
from datadog_checks.ebpf_probe.resources import bpf_file

from . import kernels
from .bpf_objects import (
    CALL_AND_RETURN_ZERO,
    MAP_HASH,
    MAP_HASH_OF_MAPS,
    MAP_RINGBUF,
    OWNER_COMM,
    PROG_SOCKET_FILTER,
    bpftool,
    counted_with_statistics_off,
    held_by_me,
    make_test_objects,
)
from .bpf_syscalls import (
    CALLS_GET_CURRENT_COMM,
    PROG_KPROBE,
    RETURNS_ZERO,
    attach_kprobe,
    map_create,
    map_delete_elem,
    map_update_batch,
    obj_pin,
    prog_load,
)
from .seams import OwnerScans, StatisticsWindows

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
ME = Owner(os.getpid(), open('/proc/self/comm').read().strip())
HASH_KINDS = ('hash', 'lru', 'hmap', 'pcpu', 'big')
KERNEL = kernels.current()


@pytest.fixture(scope='module')
def objects():
    objects = make_test_objects()
    yield objects
    objects.close()


def expected_method(made) -> str:
    """How this known kernel must count a map's entries."""
    assert KERNEL is not None
    if KERNEL.entry_counting == 'iterator':
        return 'iterator'
    if made.type == MAP_HASH_OF_MAPS:
        return KERNEL.maps_of_maps_counting
    if made.max_entries >= LARGE_MAP and KERNEL.for_each:
        return 'for_each'  # a large map: a walk 4x faster is worth a load
    return KERNEL.entry_counting


def refused_by_the_kernel(probe, hook: str, program: str) -> bool:
    """Whether the kernel refused the program of `hook`: as the kernel table says, or where the table
    has not measured this build, as the probe found; a refusal is always said, with its errno."""
    said = probe.rejected_hooks.get(hook, '').startswith('refused by the kernel: ')
    expected = KERNEL.refuses(hook) if KERNEL is not None else None
    if expected is not None:
        assert said is expected, probe.rejected_hooks
    if said:
        [limitation] = [
            line for line in probe.limitations if f'the kernel refused the {hook} program {program}' in line
        ]
        assert '(errno ' in limitation, limitation
    return said


def no_batch_for_maps_of_maps() -> bool:
    return KERNEL is not None and KERNEL.maps_of_maps_counting != 'batch'


def fixture_owner(objects):
    return (Owner(objects.pid, OWNER_COMM),)


@pytest.fixture
def probe():
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    yield probe
    probe.close()


# Statistics held on for the probe's life: exact counts, to compare with bpftool.
HELD = EbpfStatsOptions(runtime_sampling=1)


@pytest.fixture
def held_probe():
    probe = EbpfStatsProbe.load(HELD, log)
    yield probe
    probe.close()


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == 'ebpf-probe-run-time-sampler']


def stats_enabled_by_sysctl() -> str:
    with open('/proc/sys/kernel/bpf_stats_enabled') as f:
        return f.read().strip()


def test_the_probe_uses_what_the_kernel_has(probe):
    assert probe.run_time_stats
    assert probe.hooks[0] == 'BPF_ENABLE_STATS 5% of the time' and 'iter/task_file' in probe.hooks
    if KERNEL is not None:
        assert ('bpf_map_sum_elem_count' in probe.hooks) is (KERNEL.entry_counting == 'iterator')
        assert 'iter/bpf_map' in probe.hooks
        assert ('iter/bpf_prog' in probe.hooks) is KERNEL.program_iterator
        assert ('iter/bpf_prog run-time counters' in probe.rejected_hooks) is not KERNEL.run_counters_in_iterator
        expected_limitations = KERNEL.entry_counting == 'iterator' and KERNEL.run_counters_in_iterator
        expected_limitations = expected_limitations and (KERNEL.kprobe_link_missed or not KERNEL.kprobes)
        assert (probe.limitations == []) is expected_limitations
        probe.snapshot()
        assert (probe.limitations == []) is expected_limitations  # nothing more learnt while running


def test_maps_match_what_we_made_and_what_bpftool_says(objects, probe):
    snapshot = probe.snapshot()
    maps = {m.id: m for m in snapshot.maps}
    shown = {m['id']: m for m in bpftool('map', 'show')}
    for kind, made in objects.maps.items():
        record = maps[made.id]
        assert record.name == made.name
        assert record.max_entries == made.max_entries
        # Hash maps: the exact count, from one iterator pass; arrays and ring buffers: no count at all.
        assert record.entries == made.entries, kind
        if KERNEL is not None and made.entries is not None:
            assert record.entries_method == expected_method(made), kind
        assert (record.entries_method is None) is (made.entries is None)
        if made.entries is not None:
            assert record.occupancy == made.entries / made.max_entries
        assert record.owners == fixture_owner(objects)
        assert not record.pinned
        bpftool_map = shown[made.id]
        assert record.memory_bytes == bpftool_map['bytes_memlock']
        if made.type != MAP_RINGBUF:  # kernels before 6.4 say 0 for a ring buffer
            assert record.memory_bytes > 0
        assert record.max_entries == bpftool_map['max_entries']
        assert record.key_size == bpftool_map['bytes_key']
        assert record.value_size == bpftool_map['bytes_value']
        assert record.type == bpftool_map['type']
        assert record.name == bpftool_map['name']
        assert record.flags == bpftool_map['flags']


def test_every_object_bpftool_lists_is_in_the_snapshot(objects, probe):
    snapshot = probe.snapshot()
    assert {p['id'] for p in bpftool('prog', 'show')} <= {p.id for p in snapshot.programs}
    assert {m['id'] for m in bpftool('map', 'show')} <= {m.id for m in snapshot.maps}


def test_a_program_that_ran_has_run_count_and_time(objects, held_probe):
    objects.run_program(1234)
    [program] = [p for p in held_probe.snapshot().programs if p.id == objects.program_id]
    [shown] = [p for p in bpftool('prog', 'show') if p['id'] == objects.program_id]
    assert program.name == objects.program_name
    assert program.type == shown['type'] == 'socket_filter'
    assert program.run_count >= 1234
    assert program.run_count == shown['run_cnt']
    assert program.run_time_ns == shown['run_time_ns'] > 0
    assert program.translated_bytes == shown['bytes_xlated']
    assert program.jited_bytes == shown['bytes_jited']
    assert program.memory_bytes == shown['bytes_memlock']
    assert program.tag == shown['tag']
    # The verifier's count of the 2 instructions, where the kernel keeps it (5.16+).
    verified = {2} if KERNEL is None or KERNEL.verified_instructions else {None}
    assert program.verified_instructions in (verified if KERNEL else {2, None})
    assert program.owners == fixture_owner(objects)


def test_stats_are_off_again_after_close(objects):
    assert stats_enabled_by_sysctl() == '0'
    probe = EbpfStatsProbe.load(HELD, log)
    before = objects.program_run_count()
    objects.run_program(10)
    on = objects.program_run_count()
    probe.close()
    objects.run_program(10)
    off = objects.program_run_count()
    assert on == before + 10
    if off != on:
        counted_with_statistics_off()
    assert off == on  # nothing counted once the probe let go of BPF_ENABLE_STATS
    assert stats_enabled_by_sysctl() == '0'  # and the sysctl was never touched
    probe.close()  # idempotent


def test_without_collect_program_runtime_stats_stay_off(objects):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(collect_program_runtime=False), log)
    try:
        before = objects.program_run_count()
        objects.run_program(10)
        if objects.program_run_count() != before:
            counted_with_statistics_off()
        assert objects.program_run_count() == before
        assert not [hook for hook in probe.hooks if hook.startswith('BPF_ENABLE_STATS')]
        assert probe.snapshot().run_time is None
        assert sampler_threads() == []
    finally:
        probe.close()


def test_the_probes_own_objects_are_owned_by_this_process(probe):
    snapshot = probe.snapshot()
    held = held_by_me()  # as the kernel shows them: bpftool's pids
    own = [p for p in snapshot.programs if p.id in held]  # not a closed probe's, still being freed
    assert {p.id for p in own} == set(held) and held
    assert all(p.owners == (ME,) for p in own)


def test_full_program_names_come_from_btf():
    """The kernel keeps 15 characters of a name; the BTF of the program has all of it."""
    obj = libbpf.BpfObject(str(bpf_file(CORE_OBJECT)))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(collect_program_runtime=False), log)
    try:
        for program in ('mark_victim_btf', 'mark_victim_tracepoint'):
            obj.set_autoload(program, False)
        obj.load()  # only the kprobe program, which loads on any kernel
        info = libbpf.prog_info(obj.program_fd('oom_kill_process'))
        assert info.name == b'oom_kill_proces'
        [program] = [p for p in probe.snapshot().programs if p.id == info.id]
        assert program.name == 'oom_kill_process'
    finally:
        probe.close()
        obj.close()


@pytest.mark.parametrize('method', ['element_iterator', 'for_each', 'count_batch', 'count_next_key'])
def test_each_way_of_counting_counts_exactly(objects, method, monkeypatch):
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_maps_count'}))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        if method == 'element_iterator' and refused_by_the_kernel(probe, 'iter/bpf_map_elem', 'map_elements'):
            # The probe counts by the other ways (tested by the other cases) and says why not this one.
            assert 'iter/bpf_map_elem' not in probe.hooks
            assert any(line.startswith('element_iterator counting is unavailable: refused by the kernel: ')
                       for line in probe._counter.unavailable())  # fmt: skip
            return
        for kind in HASH_KINDS:
            made = objects.maps[kind]
            fd = made.open()
            try:
                if method == 'element_iterator' and made.type == MAP_HASH_OF_MAPS:
                    # The kernel's maps of maps have no element iterator (htab_of_maps_map_ops).
                    with pytest.raises(libbpf.LibbpfError) as error:
                        probe._walk_elements(fd)
                    assert error.value.errno == errno.EINVAL
                elif method == 'element_iterator':
                    assert probe._walk_elements(fd) == made.entries, kind
                elif method == 'for_each':
                    if made.type == MAP_HASH_OF_MAPS:
                        continue  # bpf_for_each_map_elem walks no maps of maps
                    if KERNEL is not None and not KERNEL.for_each:
                        with pytest.raises(libbpf.LibbpfError):  # the kernel has no bpf_for_each_map_elem
                            probe._walk_for_each(fd)
                    else:
                        assert probe._walk_for_each(fd) == made.entries, kind
                elif (
                    method == 'count_batch'
                    and made.type == MAP_HASH_OF_MAPS
                    and KERNEL
                    and KERNEL.maps_of_maps_counting != 'batch'
                ):
                    with pytest.raises(libbpf.LibbpfError) as error:  # no batch ops for maps of maps here
                        EntryCounter.count_batch(fd, libbpf.map_info(fd))
                    assert error.value.errno == libbpf.ENOTSUPP
                else:
                    assert getattr(EntryCounter, method)(fd, libbpf.map_info(fd)) == made.entries, kind
            finally:
                os.close(fd)
    finally:
        probe.close()


def counting_programs() -> set[int]:
    """Ids of the programs the probe counts entries with (as the kernel cuts their names)."""
    return {p['id'] for p in bpftool('prog', 'show') if p.get('name') in ('map_elements', 'count_with_for_')}


def test_without_the_counting_kfunc_each_map_is_walked_in_the_kernel_by_one_loaded_program(objects, monkeypatch):
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_maps_count'}))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        assert 'bpf_map_sum_elem_count' not in probe.hooks
        element_iterator = not refused_by_the_kernel(probe, 'iter/bpf_map_elem', 'map_elements')
        assert ('iter/bpf_map_elem' in probe.hooks) is element_iterator
        programs_before = counting_programs()
        for _ in range(2):
            maps = {m.id: m for m in probe.snapshot().maps}
            for kind in HASH_KINDS:  # the hash of maps comes early: what it needs changes nothing for the rest
                made = objects.maps[kind]
                assert maps[made.id].entries == made.entries, kind
                if made.type == MAP_HASH_OF_MAPS:
                    allowed = {KERNEL.maps_of_maps_counting} if KERNEL else {'batch', 'get_next_key'}
                    assert maps[made.id].entries_method in allowed, kind
                elif made.max_entries >= LARGE_MAP:  # a walk 4x faster, where the kernel has it, is worth a load
                    allowed = {'for_each'} if KERNEL is None or KERNEL.for_each else {'element_iterator'}
                    assert maps[made.id].entries_method in (allowed if KERNEL else {'for_each', 'element_iterator'})
                elif element_iterator:
                    assert maps[made.id].entries_method == 'element_iterator', kind
                else:  # refused: counted exactly all the same, without a walk in the kernel
                    assert maps[made.id].entries_method in ('batch', 'get_next_key'), kind
            assert maps[objects.maps['array'].id].entries is None
        # Counting left nothing loaded: one program attached to each small map in turn, and the
        # bpf_for_each_map_elem program for the large one freed after use (the kernel frees it a
        # moment after its last reference goes).
        deadline = time.monotonic() + 10
        while counting_programs() != programs_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counting_programs() == programs_before
        said = {limit.split(': ', 1)[0] for limit in probe.limitations if 'hash_of_maps' in limit}
        if element_iterator:  # else unavailable for every map type, said once (checked above)
            assert 'element_iterator counting is unavailable for map type hash_of_maps' in said
        if KERNEL is not None:
            assert ('batch counting is unavailable for map type hash_of_maps' in said) is no_batch_for_maps_of_maps()
    finally:
        probe.close()


def test_a_counting_way_the_kernel_lacks_is_a_limitation_not_a_silence(objects, monkeypatch):
    disabled = frozenset({'list_maps_count', 'map_elements', 'map_count'})
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', disabled)
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        maps = {m.id: m for m in probe.snapshot().maps}
        big = objects.maps['big']
        assert (maps[big.id].entries, maps[big.id].entries_method) == (big.entries, 'batch')
        assert f'element_iterator counting is unavailable: {stats_probe.WITHHELD}' in probe.limitations
        if KERNEL is not None and not KERNEL.for_each:
            assert (
                'for_each counting is unavailable: the kernel has no bpf_for_each_map_elem (5.13+)' in probe.limitations
            )
        else:
            assert f'for_each counting is unavailable: {stats_probe.WITHHELD}' in probe.limitations
    finally:
        probe.close()


def test_a_key_walk_that_restarts_gives_no_count(monkeypatch):
    """get_next_key restarts from the first key when the current one is deleted: no count, not a wrong one."""
    fd = map_create(MAP_HASH, 'restart_test', 4, 8, 100)
    try:
        keys = b''.join(struct.pack('<I', i) for i in range(50))
        map_update_batch(fd, keys, bytes(8 * 50), 50)
        info = libbpf.map_info(fd)
        assert EntryCounter.count_next_key(fd, info) == 50
        walked = []
        real_next = libbpf.map_get_next_key

        def next_key_deleting_the_10th(map_fd, key, next_key):
            if len(walked) == 10:
                map_delete_elem(map_fd, bytes(key.raw[:4]))  # the walk's current key goes away
            walked.append(1)
            return real_next(map_fd, key, next_key)

        monkeypatch.setattr(libbpf, 'map_get_next_key', next_key_deleting_the_10th)
        # The kernel restarts from the first key: 10 + 49 keys walked, a count of 59 if taken at its word.
        assert EntryCounter.count_next_key(fd, info) is None
    finally:
        os.close(fd)


def test_owners_from_proc_match_the_iterator(objects, probe):
    from_iterator = set(owner_records_from_iterator(libbpf.read_iterator(probe._iters['bpf_owners'])))
    from_proc = set(owner_records_from_proc())
    held = {r for r in from_iterator if r[0] == objects.pid}
    assert {m.id for m in objects.maps.values()} | {objects.program_id} == {r[2] for r in held}
    assert all(r[4] == OWNER_COMM for r in held)
    for pid in (objects.pid, os.getpid()):
        assert {r for r in from_iterator if r[0] == pid} == {r for r in from_proc if r[0] == pid}


def test_without_the_owner_iterator_owners_come_from_proc(objects, monkeypatch):
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'bpf_owners'}))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        maps = {m.id: m for m in probe.snapshot().maps}
        assert maps[objects.maps['hash'].id].owners == fixture_owner(objects)
    finally:
        probe.close()


@pytest.fixture
def bpffs():
    mounts = bpffs_mounts()
    if mounts:
        yield mounts[0]
        return
    # A test-machine fixture: the check itself never mounts bpffs.
    os.makedirs('/sys/fs/bpf', exist_ok=True)
    assert os.system('mount -t bpf bpf /sys/fs/bpf') == 0
    try:
        yield '/sys/fs/bpf'
    finally:
        os.system('umount /sys/fs/bpf')


def test_a_pinned_only_map_says_so(bpffs, probe):
    fd = map_create(MAP_HASH, 'pinned_only', 4, 4, 8)
    path = os.path.join(bpffs, f'ebpf-probe-test-{uuid.uuid4().hex[:8]}')
    obj_pin(fd, path)
    map_id = libbpf.map_info(fd).id
    os.close(fd)  # now only the pin holds it
    try:
        [record] = [m for m in probe.snapshot().maps if m.id == map_id]
        assert record.owners == ()
        assert record.pinned
    finally:
        os.unlink(path)


# --- Owners: found once, looked for again only when something changed ---------------------------------------


def map_record(probe, map_id):
    [record] = [m for m in probe.snapshot().maps if m.id == map_id]
    return record


def object_ids(snapshot) -> set[tuple[str, int]]:
    return {('map', m.id) for m in snapshot.maps} | {('prog', p.id) for p in snapshot.programs}


def without_counting_programs(before: set[int]) -> None:
    """Wait until the kernel freed the programs a run's counting loaded (it frees them a moment later)."""
    deadline = time.monotonic() + 60
    while counting_programs() - before and time.monotonic() < deadline:
        time.sleep(0.05)


def test_owners_are_not_looked_for_again_on_a_steady_host(objects, probe, monkeypatch):
    """Two runs that see the same objects with the same holders: the second walks no file descriptors."""
    walks = OwnerScans(monkeypatch)
    baseline = counting_programs()
    without_counting_programs(baseline)
    previous = object_ids(probe.snapshot())
    for _ in range(20):  # until the host is steady: objects of earlier tests may still be going
        without_counting_programs(baseline)
        scans = walks.count
        now = object_ids(probe.snapshot())
        if now == previous and walks.count == scans:
            return
        previous = now
    raise AssertionError(f'every run walked the file descriptors again ({walks.count} walks)')


def test_counting_maps_one_by_one_does_not_make_owners_looked_for_again(objects, monkeypatch):
    """Without the kfunc, counting attaches links and loads programs for a moment: not new objects."""
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_maps_count'}))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    walks = OwnerScans(monkeypatch)
    try:
        baseline = counting_programs()
        ids = object_ids(probe.snapshot())
        steady = 0  # runs in a row that walked no file descriptors
        for _ in range(30):
            # The kernel frees what a run's counting held (a program, its references to the map) a
            # moment later, after its programs go: a run before then sees references change.
            without_counting_programs(baseline)
            scans = walks.count
            if object_ids(probe.snapshot()) != ids:  # another process on this machine (a VM row: a failure)
                pytest.skip('objects came or went meanwhile: another process loads BPF objects here')
            steady = steady + 1 if walks.count == scans else 0
            if steady == 3:
                return
        raise AssertionError(f'runs kept walking the file descriptors ({walks.count} walks)')
    finally:
        probe.close()


def test_the_owner_of_a_new_object_is_there_on_the_first_run_that_sees_it(objects, probe, monkeypatch):
    walks = OwnerScans(monkeypatch)
    probe.snapshot()
    scans = walks.count
    map_id = objects.new_map()
    record = map_record(probe, map_id)
    assert record.owners == fixture_owner(objects)
    assert walks.count == scans + 1  # one walk of every fd, for the new map


def test_an_owner_that_exits_is_noticed(probe):
    parent = make_test_objects(comm='bpf-parent')
    child = None
    try:
        map_id = parent.new_map()
        child = parent.fork('bpf-child')  # holds the same open file: the map's references do not change
        record = map_record(probe, map_id)
        assert [o.comm for o in record.owners] == ['bpf-parent', 'bpf-child']
        parent.close()  # the parent exits; the child holds the map alone
        deadline = time.monotonic() + 10
        while [o.comm for o in map_record(probe, map_id).owners] != ['bpf-child'] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert map_record(probe, map_id).owners == (Owner(child, 'bpf-child'),)
    finally:
        parent.close()
        if child is not None:
            os.kill(child, signal.SIGKILL)  # an orphan: init reaps it


def test_an_owner_that_closes_its_fd_but_lives_is_noticed(objects, probe):
    second = make_test_objects(comm='bpf-second')
    try:
        map_id = objects.new_map()
        assert map_record(probe, map_id).owners == fixture_owner(objects)
        second.hold(map_id)
        assert [o.comm for o in map_record(probe, map_id).owners] == [OWNER_COMM, 'bpf-second']
        objects.release(map_id)  # the first holder lets go and lives on
        assert map_record(probe, map_id).owners == (Owner(second.pid, 'bpf-second'),)
    finally:
        second.close()


# --- Run time: statistics on for a window of each interval ------------------------------------------------


def test_statistics_are_on_only_for_a_window_after_a_snapshot(objects, monkeypatch):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(interval=1.0), log)  # windows of 5% of 1 s
    windows = StatisticsWindows(monkeypatch)
    try:
        assert len(sampler_threads()) == 1
        probe.snapshot()  # the first window opens at once, for 0.05 s
        deadline = time.monotonic() + 60
        while windows.opened < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # The sampler's thread closes the window: its fd leaves /proc at once, and the kernel turns
        # statistics off when that close has run its course (slow under an emulated CPU). Until a
        # run is not counted, then never again.
        while time.monotonic() < deadline:
            before = objects.program_run_count()
            objects.run_program(1)
            if objects.program_run_count() == before:
                break
            time.sleep(0.01)
        before = objects.program_run_count()
        objects.run_program(100)
        if objects.program_run_count() != before:
            counted_with_statistics_off()
        assert objects.program_run_count() == before  # off between windows: no tax
        assert windows.opened == 1  # one window per interval, none without a snapshot
    finally:
        probe.close()
    assert sampler_threads() == []  # close() stops its thread


def test_with_someone_else_holding_statistics_the_counts_are_raw(objects, monkeypatch):
    """bpftop (here, this test) keeps statistics on: the counters are not scaled, whatever our windows."""
    # One window of 0.1 s right after the first snapshot, and no other before the second.
    probe = EbpfStatsProbe.load(EbpfStatsOptions(interval=100.0, runtime_sampling=0.001), log)
    windows = StatisticsWindows(monkeypatch)
    try:
        first = probe.snapshot()
        deadline = time.monotonic() + 30
        while windows.closed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert windows.opened == 1
        time.sleep(0.3)  # our window is over and settled (its last runs counted)
        other = libbpf.enable_stats()
        try:
            objects.run_program(5000)
        finally:
            os.close(other)
        second = probe.snapshot()
        before, after = ({p.id: p for p in s.programs}[objects.program_id] for s in (first, second))
        assert second.run_time is not None and second.run_time.source == 'external'
        assert second.run_time.scale == 1.0
        assert after.run_count - before.run_count == 5000
    finally:
        probe.close()


# --- The inventory: iterators, else object by object, the same figures ------------------------------------


def test_object_by_object_gives_what_the_iterators_give(objects, held_probe, monkeypatch):
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_programs', 'list_maps'}))
    by_fd = EbpfStatsProbe.load(EbpfStatsOptions(runtime_sampling=1), log)
    try:
        assert 'iter/bpf_prog' not in by_fd.hooks and 'iter/bpf_map' not in by_fd.hooks
        mine = {objects.program_id} | {m.id for m in objects.maps.values()}
        fast, slow = held_probe.snapshot(), by_fd.snapshot()
        for kind in ('programs', 'maps'):
            a = {r.id: r for r in getattr(fast, kind) if r.id in mine}
            b = {r.id: r for r in getattr(slow, kind) if r.id in mine}
            assert a.keys() == b.keys() and a
            for object_id, record in a.items():
                other = b[object_id]
                if kind == 'maps' and record.entries_method == 'iterator':
                    other.entries_method = 'iterator'  # counted map by map there: same count
                if kind == 'maps':
                    assert other.memory_cgroup_id is None  # read in the iterator only: not known by fd
                    other.memory_cgroup_id = record.memory_cgroup_id
                assert record == other
    finally:
        by_fd.close()


def test_a_program_of_several_functions_has_bpftools_jit_size(held_probe):
    """Subprograms are JIT-compiled one by one: their sizes add up (asked once through an fd)."""
    fd = prog_load(PROG_SOCKET_FILTER, 'two_functions', CALL_AND_RETURN_ZERO)
    try:
        prog_id = libbpf.prog_info(fd).id
        assert libbpf.prog_info(fd).nr_jited_func_lens == 2
        [program] = [p for p in held_probe.snapshot().programs if p.id == prog_id]
        [shown] = [p for p in bpftool('prog', 'show') if p['id'] == prog_id]
        assert program.jited_bytes == shown['bytes_jited'] > 0
        assert program.translated_bytes == shown['bytes_xlated']
        assert program.name == 'two_functions'
    finally:
        os.close(fd)


# --- kprobe misses ----------------------------------------------------------------------------------------


def test_this_kernels_btf_has_the_missed_counts_where_the_code_reads_them():
    with Btf.open() as btf:
        counts = links.kernel_counts_kprobe_misses(btf)
    if KERNEL is not None:
        assert counts is KERNEL.kprobe_link_missed


def test_kprobe_misses_where_the_kernel_counts_them(probe):
    if KERNEL is None:
        # Unknown kernel: only that it says what it does.
        assert 'bpf_link_info (kprobe misses)' in probe.hooks or 'kprobe misses' in probe.rejected_hooks
        return
    if not KERNEL.kprobes:
        assert 'kernel offers no kprobes' in probe.rejected_hooks['kprobe misses']
        return
    if not KERNEL.kprobe_link_missed:
        assert 'no missed counts (6.7+)' in probe.rejected_hooks['kprobe misses']
        return
    assert 'bpf_link_info (kprobe misses)' in probe.hooks
    # A kprobe hit while another kprobe's program runs on the CPU is missed (kprobes do not nest):
    # one on the helper that a program on every open() calls misses once per open(), at least.
    outer = prog_load(PROG_KPROBE, 'on_open', CALLS_GET_CURRENT_COMM)
    inner = prog_load(PROG_KPROBE, 'in_a_kprobe', RETURNS_ZERO)
    fds = [outer, inner]
    try:
        fds += attach_kprobe(inner, 'bpf_get_current_comm')
        [before] = [p.kprobe_misses for p in probe.snapshot().programs if p.id == libbpf.prog_info(inner).id]
        fds += attach_kprobe(outer, 'do_sys_openat2')
        for _ in range(100):
            open('/proc/self/stat').close()
        [program] = [p for p in probe.snapshot().programs if p.id == libbpf.prog_info(inner).id]
        assert before == 0 and program.kprobe_misses >= 100
    finally:
        for fd in fds:
            os.close(fd)


# --- A program the kernel refuses -----------------------------------------------------------------


@pytest.mark.parametrize('program', ['list_programs', 'program_stats', 'list_maps_count', 'list_maps', 'bpf_owners'])
def test_a_program_the_kernel_refuses_costs_only_what_needs_it(objects, monkeypatch, program):
    """As a security policy that refuses one program type would: the others load, counts stay exact."""
    # The map iterator is the kfunc's stand-in: refused without the kfunc's counting, as before 6.6.
    monkeypatch.setattr(
        stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_maps_count'} if program == 'list_maps' else ())
    )
    options = EbpfStatsOptions(collect_program_runtime=False)
    plain = EbpfStatsProbe.load(options, log)
    try:
        loaded = set(held_by_me().values())
    finally:
        plain.close()
    if program not in loaded:  # a kernel without it: nothing to refuse (the kfunc 6.6+, counters 5.19+)
        assert program in ('list_maps_count', 'program_stats'), loaded
        hook = 'bpf_map_sum_elem_count' if program == 'list_maps_count' else 'iter/bpf_prog run-time counters'
        assert plain.rejected_hooks.get(hook), plain.rejected_hooks  # and said why
        if KERNEL is not None:
            assert not (
                KERNEL.entry_counting == 'iterator' if program == 'list_maps_count' else KERNEL.run_counters_in_iterator
            )
        return
    real_set_autoload, real_load = libbpf.BpfObject.set_autoload, libbpf.BpfObject.load

    def set_autoload(self, name, autoload):
        if autoload:
            self.__dict__.setdefault('autoloaded', set()).add(name)
        real_set_autoload(self, name, autoload)

    def load(self):
        if program in self.__dict__.get('autoloaded', ()):
            raise libbpf.LibbpfError(f'bpf_object__load({os.path.basename(self.path)})', errno.EPERM)
        real_load(self)

    monkeypatch.setattr(libbpf.BpfObject, 'set_autoload', set_autoload)
    monkeypatch.setattr(libbpf.BpfObject, 'load', load)
    probe = EbpfStatsProbe.load(options, log)
    try:
        hook = ITERATORS[program]
        assert probe.rejected_hooks[hook].startswith('refused by the kernel: bpf_object__load(ebpf_stats.bpf.o) ')
        assert '(errno 1)' in probe.rejected_hooks[hook]
        [said] = [line for line in probe.limitations if f'the kernel refused the {hook} program {program}' in line]
        assert said.endswith(REFUSAL_COSTS[program])
        now = set(held_by_me().values())
        # Every other program still loads; the kfunc's counting gives way to the map iterator and walks.
        stand_ins = {'list_maps', 'map_elements'} if program == 'list_maps_count' else set()
        assert now - stand_ins == loaded - {program}, probe.rejected_hooks
        snapshot = probe.snapshot()
        maps = {m.id: m for m in snapshot.maps}
        for kind in HASH_KINDS:
            assert maps[objects.maps[kind].id].entries == objects.maps[kind].entries, kind
        assert {m['id'] for m in bpftool('map', 'show')} <= set(maps)
        [made] = [p for p in snapshot.programs if p.id == objects.program_id]
        assert made.owners == fixture_owner(objects)
    finally:
        probe.close()


# --- What the iterators write, as the compiled object lays it out -----------------------------------


@pytest.mark.parametrize('name, layout', [('prog_record', inventory.PROG_RECORD), ('map_record', inventory.MAP_RECORD)])
def test_the_iterator_records_match_the_compiled_object_field_by_field(name, layout):
    obj = libbpf.BpfObject(str(bpf_file(STATS_OBJECT)))
    try:
        btf = Btf.of_object(obj)
        record = btf.find(name, 4)
        assert btf.size(record) == layout.size
        in_btf = [(offset_bits // 8, btf.size(member_type)) for _name, member_type, offset_bits in btf.members(record)]
    finally:
        obj.close()
    items = re.findall(r'\d*[a-zA-Z]', layout.format[1:])
    ours = [(struct.calcsize('<' + ''.join(items[:i])), struct.calcsize('<' + item)) for i, item in enumerate(items)]
    assert in_btf == ours


@pytest.mark.slow
def test_a_walk_of_more_than_a_million_elements_goes_on_past_the_kernels_pause(monkeypatch):
    """The kernel pauses an iterator (EAGAIN) after a million objects with nothing written yet:
    the element iterator writes only at the end of a map, so a bigger map meets it."""
    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_maps_count'}))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(collect_program_runtime=False), log)
    try:
        if refused_by_the_kernel(probe, 'iter/bpf_map_elem', 'map_elements'):
            return  # this kernel has no such walk: the refusal is said (checked above)
        count = (1 << 20) + 1000
        fd = map_create(MAP_HASH, 'million_plus', 4, 8, count)
        try:
            keys = struct.pack(f'<{count}I', *range(count))
            assert map_update_batch(fd, keys, bytes(8 * count), count) == count
            assert probe._walk_elements(fd) == count
        finally:
            os.close(fd)
    finally:
        probe.close()
