# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The eBPF stats probe against the real kernel, checked against bpftool."""

import errno
import logging
import os
import struct
import time
import uuid

import pytest

from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe, Owner
from datadog_checks.ebpf_probe.ebpf_stats.entries import LARGE_MAP, EntryCounter
from datadog_checks.ebpf_probe.ebpf_stats.owners import (
    bpffs_mounts,
    owner_records_from_iterator,
    owner_records_from_proc,
)
from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.oom_kill.core import CORE_OBJECT
from datadog_checks.ebpf_probe.resources import bpf_file

from . import kernels
from .bpf_objects import MAP_HASH, MAP_HASH_OF_MAPS, MAP_RINGBUF, OWNER_COMM, bpftool, make_test_objects
from .bpf_syscalls import map_create, map_update_batch, obj_pin

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


def fixture_owner(objects):
    return (Owner(objects.pid, OWNER_COMM),)


@pytest.fixture
def probe():
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    yield probe
    probe.close()


def stats_enabled_by_sysctl() -> str:
    with open('/proc/sys/kernel/bpf_stats_enabled') as f:
        return f.read().strip()


def test_the_probe_uses_what_the_kernel_has_and_holds_the_stats_fd(probe):
    assert probe.run_time_stats
    assert probe.hooks[0] == 'BPF_ENABLE_STATS' and 'iter/task_file' in probe.hooks
    if KERNEL is not None:
        with_iterator = KERNEL.entry_counting == 'iterator'
        assert ('iter/bpf_map' in probe.hooks) is with_iterator
        assert (probe.limitations == []) is with_iterator


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


def test_a_program_that_ran_has_run_count_and_time(objects, probe):
    objects.run_program(1234)
    [program] = [p for p in probe.snapshot().programs if p.id == objects.program_id]
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
    assert program.verified_instructions == 2
    assert program.owners == fixture_owner(objects)


def test_stats_are_off_again_after_close(objects):
    assert stats_enabled_by_sysctl() == '0'
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    before = objects.program_run_count()
    objects.run_program(10)
    on = objects.program_run_count()
    probe.close()
    objects.run_program(10)
    off = objects.program_run_count()
    assert on == before + 10
    assert off == on  # nothing counted once the probe let go of BPF_ENABLE_STATS
    assert stats_enabled_by_sysctl() == '0'  # and the sysctl was never touched
    probe.close()  # idempotent


def test_without_collect_program_runtime_stats_stay_off(objects):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(collect_program_runtime=False), log)
    try:
        before = objects.program_run_count()
        objects.run_program(10)
        assert objects.program_run_count() == before
        assert 'BPF_ENABLE_STATS' not in probe.hooks
        assert not probe.snapshot().run_time_stats
    finally:
        probe.close()


def test_the_probes_own_objects_are_owned_by_this_process(probe):
    snapshot = probe.snapshot()
    iterators = {'iter/bpf_map': 'map_entries', 'iter/bpf_map_elem': 'map_elements', 'iter/task_file': 'bpf_owners'}
    loaded = {iterators[hook] for hook in probe.hooks if hook in iterators}
    assert len(loaded) >= 2
    own = [p for p in snapshot.programs if p.name in loaded and ME in p.owners]  # not another process's probe
    assert sorted(p.name for p in own) == sorted(loaded)
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
def test_each_way_of_counting_counts_exactly(objects, method):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(disabled_iterators=frozenset({'map_entries'})), log)
    try:
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
                else:
                    assert getattr(EntryCounter, method)(fd, libbpf.map_info(fd)) == made.entries, kind
            finally:
                os.close(fd)
    finally:
        probe.close()


def counting_programs() -> set[int]:
    """Ids of the programs the probe counts entries with (as the kernel cuts their names)."""
    return {p['id'] for p in bpftool('prog', 'show') if p.get('name') in ('map_elements', 'count_with_for_')}


def test_without_the_counting_kfunc_each_map_is_walked_in_the_kernel_by_one_loaded_program(objects):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(disabled_iterators=frozenset({'map_entries'})), log)
    try:
        assert 'iter/bpf_map' not in probe.hooks and 'iter/bpf_map_elem' in probe.hooks
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
                else:
                    assert maps[made.id].entries_method == 'element_iterator', kind
            assert maps[objects.maps['array'].id].entries is None
        # Counting left nothing loaded: one program attached to each small map in turn, and the
        # bpf_for_each_map_elem program for the large one freed after use (the kernel frees it a
        # moment after its last reference goes).
        deadline = time.monotonic() + 10
        while counting_programs() != programs_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counting_programs() == programs_before
        [said] = [limit for limit in probe.limitations if 'hash_of_maps' in limit]
        assert said.startswith('element_iterator counting is unavailable for map type hash_of_maps: ')
    finally:
        probe.close()


def test_a_counting_way_the_kernel_lacks_is_a_limitation_not_a_silence(objects):
    disabled = frozenset({'map_entries', 'map_elements', 'map_count'})
    probe = EbpfStatsProbe.load(EbpfStatsOptions(disabled_iterators=disabled), log)
    try:
        maps = {m.id: m for m in probe.snapshot().maps}
        big = objects.maps['big']
        assert (maps[big.id].entries, maps[big.id].entries_method) == (big.entries, 'batch')
        assert 'element_iterator counting is unavailable: disabled by the probe options' in probe.limitations
        assert 'for_each counting is unavailable: disabled by the probe options' in probe.limitations
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
                libbpf.map_delete_elem(map_fd, bytes(key.raw[:4]))  # the walk's current key goes away
            walked.append(1)
            return real_next(map_fd, key, next_key)

        monkeypatch.setattr(libbpf, 'map_get_next_key', next_key_deleting_the_10th)
        # The kernel restarts from the first key: 10 + 49 keys walked, a count of 59 if taken at its word.
        assert EntryCounter.count_next_key(fd, info) is None
    finally:
        os.close(fd)


def test_owners_from_proc_match_the_iterator(objects, probe):
    from_iterator = set(owner_records_from_iterator(libbpf.read_iterator(probe._owner_iter)))
    from_proc = set(owner_records_from_proc())
    held = {r for r in from_iterator if r[0] == objects.pid}
    assert {m.id for m in objects.maps.values()} | {objects.program_id} == {r[2] for r in held}
    assert all(r[4] == OWNER_COMM for r in held)
    for pid in (objects.pid, os.getpid()):
        assert {r for r in from_iterator if r[0] == pid} == {r for r in from_proc if r[0] == pid}


def test_without_the_owner_iterator_owners_come_from_proc(objects):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(disabled_iterators=frozenset({'bpf_owners'})), log)
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
