# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""eBPF accounting against the real kernel, checked against bpftool."""

import logging
import os
import uuid

import pytest

from datadog_checks.ebpf_probe import libbpf
from datadog_checks.ebpf_probe.ebpf_stats import (
    MAP_COUNT_OBJECT,
    EbpfStatsOptions,
    EbpfStatsProbe,
    EntryCounter,
    Owner,
    bpffs_mounts,
    owner_records_from_iterator,
    owner_records_from_proc,
)
from datadog_checks.ebpf_probe.resources import bpf_file

from .bpf_objects import OWNER_COMM, bpftool, make_test_objects

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
ME = Owner(os.getpid(), open('/proc/self/comm').read().strip())
HASH_KINDS = ('hash', 'lru', 'pcpu', 'big')


@pytest.fixture(scope='module')
def objects():
    objects = make_test_objects()
    yield objects
    objects.close()


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


def test_the_probe_uses_the_iterators_and_holds_the_stats_fd(probe):
    assert probe.hooks == ['BPF_ENABLE_STATS', 'iter/bpf_map', 'iter/task_file']
    assert probe.limitations == []
    assert probe.run_time_stats


def test_maps_match_what_we_made_and_what_bpftool_says(objects, probe):
    snapshot = probe.get_and_flush()
    maps = {m.id: m for m in snapshot.maps}
    shown = {m['id']: m for m in bpftool('map', 'show')}
    for kind, made in objects.maps.items():
        record = maps[made.id]
        assert record.name == made.name
        assert record.max_entries == made.max_entries
        # Hash maps: the exact count, from one iterator pass; arrays and ring buffers: no count at all.
        assert record.entries == made.entries, kind
        assert record.entries_method == ('iterator' if made.entries is not None else None)
        if made.entries is not None:
            assert record.occupancy == made.entries / made.max_entries
        assert record.owners == fixture_owner(objects)
        assert not record.pinned
        bpftool_map = shown[made.id]
        assert record.memory_bytes == bpftool_map['bytes_memlock'] > 0
        assert record.max_entries == bpftool_map['max_entries']
        assert record.key_size == bpftool_map['bytes_key']
        assert record.value_size == bpftool_map['bytes_value']
        assert record.type == bpftool_map['type']
        assert record.name == bpftool_map['name']
        assert record.flags == bpftool_map['flags']


def test_every_object_bpftool_lists_is_in_the_snapshot(objects, probe):
    snapshot = probe.get_and_flush()
    assert {p['id'] for p in bpftool('prog', 'show')} <= {p.id for p in snapshot.programs}
    assert {m['id'] for m in bpftool('map', 'show')} <= {m.id for m in snapshot.maps}


def test_a_program_that_ran_has_run_count_and_time(objects, probe):
    objects.run_program(1234)
    [program] = [p for p in probe.get_and_flush().programs if p.id == objects.program_id]
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
        assert not probe.get_and_flush().run_time_stats
    finally:
        probe.close()


def test_the_probes_own_objects_are_owned_by_this_process(probe):
    snapshot = probe.get_and_flush()
    own = [p for p in snapshot.programs if p.name in ('map_entries', 'bpf_owners')]
    assert len(own) == 2
    assert all(p.owners == (ME,) for p in own)


def test_full_program_names_come_from_btf():
    """The kernel keeps 15 characters of a name; the BTF of the program has all of it."""
    target = libbpf.map_create(1, 'name_test', 4, 4, 1)
    obj = libbpf.BpfObject(str(bpf_file(MAP_COUNT_OBJECT)))
    probe = EbpfStatsProbe.load(EbpfStatsOptions(collect_program_runtime=False), log)
    try:
        obj.reuse_map_fd('count_target', target)
        obj.load()
        prog_id = libbpf.prog_info(obj.program_fd('count_with_for_each')).id
        assert libbpf.prog_info(obj.program_fd('count_with_for_each')).name == b'count_with_for_'
        [program] = [p for p in probe.get_and_flush().programs if p.id == prog_id]
        assert program.name == 'count_with_for_each'
    finally:
        probe.close()
        obj.close()
        os.close(target)


@pytest.mark.parametrize('method', ['count_for_each', 'count_batch', 'count_next_key'])
def test_each_fallback_counts_exactly(objects, method):
    counter = EntryCounter(bpf_file(MAP_COUNT_OBJECT))
    for kind in HASH_KINDS:
        made = objects.maps[kind]
        fd = made.open()
        try:
            if method == 'count_for_each':
                assert counter.count_for_each(fd) == made.entries, kind
            else:
                assert getattr(counter, method)(fd, libbpf.map_info(fd)) == made.entries, kind
        finally:
            os.close(fd)


def test_without_the_map_iterator_maps_are_counted_one_by_one(objects):
    probe = EbpfStatsProbe.load(EbpfStatsOptions(disabled_iterators=frozenset({'map_entries'})), log)
    try:
        assert 'iter/bpf_map' not in probe.hooks
        maps = {m.id: m for m in probe.get_and_flush().maps}
        for kind in HASH_KINDS:
            made = objects.maps[kind]
            assert (maps[made.id].entries, maps[made.id].entries_method) == (made.entries, 'for_each')
        assert maps[objects.maps['array'].id].entries is None
    finally:
        probe.close()


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
        maps = {m.id: m for m in probe.get_and_flush().maps}
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
    fd = libbpf.map_create(1, 'pinned_only', 4, 4, 8)
    path = os.path.join(bpffs, f'ebpf-probe-test-{uuid.uuid4().hex[:8]}')
    libbpf.obj_pin(fd, path)
    map_id = libbpf.map_info(fd).id
    os.close(fd)  # now only the pin holds it
    try:
        [record] = [m for m in probe.get_and_flush().maps if m.id == map_id]
        assert record.owners == ()
        assert record.pinned
    finally:
        os.unlink(path)
