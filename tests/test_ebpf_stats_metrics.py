# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""eBPF stats snapshots -> metric points: grouping, patterns, limits, run-time deltas and totals."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datadog_checks.ebpf_probe import formatting
from datadog_checks.ebpf_probe.ebpf_stats import EbpfSnapshot, MapRecord, Owner, ProgramRecord
from datadog_checks.ebpf_probe.ebpf_stats.metrics import (
    COUNT,
    GAUGE,
    SELF_TAG,
    MetricOptions,
    NamePatterns,
    Point,
    StatsMetrics,
    owner_label,
)
from datadog_checks.ebpf_probe.ebpf_stats.records import ALWAYS_COUNTED

pytestmark = pytest.mark.unit

OWN_PID = 4242
SYSTEMD = Owner(1, 'systemd')
TOOL = Owner(100, 'bpftool')
AGENT = Owner(OWN_PID, 'agent')

RUN_TIME_METRICS = {
    'program.run_time',
    'program.run_count',
    'program.recursion_misses',
    'program.average_run_time',
    'program.cpu_usage',
}


# --- helpers -------------------------------------------------------------------


def program(id, name='prog', type='kprobe', *, owners=(TOOL,), pinned=False, **overrides) -> ProgramRecord:
    fields = {
        'id': id,
        'name': name,
        'type': type,
        'tag': 'a0b1c2d3e4f50617',
        'translated_bytes': 100,
        'jited_bytes': 80,
        'verified_instructions': 10,
        'memory_bytes': 4096,
        'run_time_ns': 0,
        'run_count': 0,
        'recursion_misses': 0,
        'map_ids': (),
        'owners': tuple(owners),
        'pinned': pinned,
    }
    fields.update(overrides)
    return ProgramRecord(**fields)


def bpf_map(id, name='map', type='hash', *, owners=(TOOL,), pinned=False, **overrides) -> MapRecord:
    fields = {
        'id': id,
        'name': name,
        'type': type,
        'type_id': 1,
        'key_size': 4,
        'value_size': 8,
        'max_entries': 100,
        'flags': 0,
        'memory_bytes': 1024,
        'entries': 10,
        'entries_method': 'iterator',
        'owners': tuple(owners),
        'pinned': pinned,
    }
    fields.update(overrides)
    return MapRecord(**fields)


def snapshot(t, programs=(), maps=(), run_time_stats=True, run_time=ALWAYS_COUNTED) -> EbpfSnapshot:
    """run_time_stats False: statistics not collected; run_time: how much of the interval they counted."""
    return EbpfSnapshot(t, list(programs), list(maps), run_time if run_time_stats else None)


def stats_metrics(**options) -> StatsMetrics:
    return StatsMetrics(MetricOptions(own_pid=OWN_PID, **options))


def by_key(points: list[Point]) -> dict[tuple[str, tuple[str, ...]], float]:
    """{(metric, tags): value}, checking that no series is submitted twice in one run."""
    result = {}
    for p in points:
        key = (p.metric, p.tags)
        assert key not in result, f'{key} submitted twice'
        result[key] = p.value
    return result


def metric(points: list[Point], name: str) -> dict[tuple[str, ...], float]:
    """{tags: value} of one metric."""
    return {tags: value for (m, tags), value in by_key(points).items() if m == name}


def metric_names(points: list[Point]) -> set[str]:
    return {p.metric for p in points}


def prog_tags(name='prog', type='kprobe', owner='bpftool', own=False) -> tuple[str, ...]:
    return (f'program_name:{name}', f'program_type:{type}', f'owner:{owner}', *((SELF_TAG,) if own else ()))


def map_tags(name='map', type='hash', owner='bpftool', own=False) -> tuple[str, ...]:
    return (f'map_name:{name}', f'map_type:{type}', f'owner:{owner}', *((SELF_TAG,) if own else ()))


def totals(points: list[Point]) -> dict[tuple[str, tuple[str, ...]], float]:
    names = {'programs.total', 'programs.memory', 'maps.total', 'maps.memory'}
    return {key: value for key, value in by_key(points).items() if key[0] in names}


def two_runs(first_programs, second_programs, *, interval=10.0, run_time_stats=True, **options) -> list[Point]:
    acc = stats_metrics(**options)
    acc.points(snapshot(100.0, first_programs, run_time_stats=run_time_stats))
    return acc.points(snapshot(100.0 + interval, second_programs, run_time_stats=run_time_stats))


def mixed_objects() -> tuple[list[ProgramRecord], list[MapRecord]]:
    programs = [
        program(1, 'a', 'kprobe', memory_bytes=4096),
        program(2, 'b', 'kprobe', memory_bytes=1000),
        program(3, 'c', 'tracing', memory_bytes=None),
        program(4, 'd', 'kprobe', owners=(AGENT,), memory_bytes=500),
        program(5, 'e', 'kprobe', owners=(), memory_bytes=7),
        program(6, 'f', 'kprobe', owners=(), pinned=True, memory_bytes=9),
    ]
    maps = [
        bpf_map(10, 'm1', 'hash', memory_bytes=1024),
        bpf_map(11, 'm2', 'hash', memory_bytes=2048),
        bpf_map(12, 'm3', 'array', memory_bytes=None, entries=None),
        bpf_map(13, 'm4', 'hash', owners=(TOOL, AGENT), memory_bytes=300),
        bpf_map(14, '.rodata', 'array', owners=(), pinned=True, memory_bytes=64, entries=None),
    ]
    return programs, maps


MIXED_TOTALS = {
    ('programs.total', ('program_type:kprobe', 'owner:bpftool')): 2,
    ('programs.memory', ('program_type:kprobe', 'owner:bpftool')): 5096,
    ('programs.total', ('program_type:tracing', 'owner:bpftool')): 1,
    ('programs.memory', ('program_type:tracing', 'owner:bpftool')): 0,
    ('programs.total', ('program_type:kprobe', 'owner:agent', SELF_TAG)): 1,
    ('programs.memory', ('program_type:kprobe', 'owner:agent', SELF_TAG)): 500,
    ('programs.total', ('program_type:kprobe', 'owner:kernel')): 1,
    ('programs.memory', ('program_type:kprobe', 'owner:kernel')): 7,
    ('programs.total', ('program_type:kprobe', 'owner:pinned')): 1,
    ('programs.memory', ('program_type:kprobe', 'owner:pinned')): 9,
    ('maps.total', ('map_type:hash', 'owner:bpftool')): 2,
    ('maps.memory', ('map_type:hash', 'owner:bpftool')): 3072,
    ('maps.total', ('map_type:array', 'owner:bpftool')): 1,
    ('maps.memory', ('map_type:array', 'owner:bpftool')): 0,
    ('maps.total', ('map_type:hash', 'owner:bpftool', SELF_TAG)): 1,
    ('maps.memory', ('map_type:hash', 'owner:bpftool', SELF_TAG)): 300,
    ('maps.total', ('map_type:array', 'owner:pinned')): 1,
    ('maps.memory', ('map_type:array', 'owner:pinned')): 64,
}


# --- totals --------------------------------------------------------------------


def test_an_empty_snapshot_gives_only_the_unreported_counts():
    points = stats_metrics().points(snapshot(1.0))
    assert points == [
        Point('programs.unreported', GAUGE, 0, ()),
        Point('maps.unreported', GAUGE, 0, ()),
    ]


def test_totals_per_type_and_owner():
    programs, maps = mixed_objects()
    points = stats_metrics().points(snapshot(1.0, programs, maps))
    assert totals(points) == MIXED_TOTALS
    assert {p.type for p in points if p.metric.startswith(('programs.', 'maps.'))} == {GAUGE}


@pytest.mark.parametrize(
    'options',
    [
        pytest.param({'programs': NamePatterns.compile(['^zzz'], None)}, id='program-include-nothing'),
        pytest.param({'maps': NamePatterns.compile(None, ['.'])}, id='map-exclude-everything'),
        pytest.param({'max_programs': 0, 'max_maps': 0}, id='limits-zero'),
        pytest.param({'max_programs': 1, 'max_maps': 1}, id='limits-one'),
        pytest.param({'exclude_own_objects': True}, id='exclude-own'),
        pytest.param(
            {
                'programs': NamePatterns.compile(['a'], ['b']),
                'maps': NamePatterns.compile(['m'], ['1']),
                'max_programs': 0,
                'max_maps': 1,
                'exclude_own_objects': True,
                'run_time': False,
            },
            id='all-at-once',
        ),
    ],
)
def test_totals_count_every_object_whatever_the_patterns_limits_and_own_exclusion(options):
    programs, maps = mixed_objects()
    points = stats_metrics(**options).points(snapshot(1.0, programs, maps))
    assert totals(points) == MIXED_TOTALS


# --- owners --------------------------------------------------------------------


def test_owner_label_is_the_first_owner_by_pid():
    assert owner_label((SYSTEMD, TOOL, AGENT), pinned=False) == 'systemd'
    assert owner_label((TOOL, AGENT), pinned=True) == 'bpftool'  # a holder wins over the pin


def test_owner_label_without_owner_is_pinned_or_kernel():
    assert owner_label((), pinned=True) == 'pinned'
    assert owner_label((), pinned=False) == 'kernel'


def test_owner_tags_on_series():
    programs = [
        program(1, 'held', owners=(SYSTEMD, TOOL)),
        program(2, 'pinned', owners=(), pinned=True),
        program(3, 'orphan', owners=(), pinned=False),
        program(4, 'shared', owners=(SYSTEMD, AGENT)),  # labelled by systemd, but ours too
        program(5, 'mine', owners=(AGENT,)),
    ]
    instances = metric(stats_metrics().points(snapshot(1.0, programs)), 'program.instances')
    assert instances == {
        prog_tags('held', owner='systemd'): 1,
        prog_tags('pinned', owner='pinned'): 1,
        prog_tags('orphan', owner='kernel'): 1,
        prog_tags('shared', owner='systemd', own=True): 1,
        prog_tags('mine', owner='agent', own=True): 1,
    }


def test_own_objects_are_a_different_series_from_the_same_comm():
    maps = [bpf_map(1, owners=(Owner(7, 'agent'),)), bpf_map(2, owners=(AGENT,))]
    instances = metric(stats_metrics().points(snapshot(1.0, maps=maps)), 'map.instances')
    assert instances == {map_tags(owner='agent'): 1, map_tags(owner='agent', own=True): 1}


# --- grouping ------------------------------------------------------------------


def test_programs_with_the_same_name_type_and_owner_are_one_series():
    programs = [
        program(1, 'handler', translated_bytes=100, jited_bytes=80, verified_instructions=10, memory_bytes=4096),
        program(2, 'handler', translated_bytes=200, jited_bytes=150, verified_instructions=25, memory_bytes=8192),
    ]
    points = stats_metrics().points(snapshot(1.0, programs))
    tags = prog_tags('handler')
    assert {key: value for key, value in by_key(points).items() if key[0].startswith('program.')} == {
        ('program.instances', tags): 2,
        ('program.attachments', (*tags, 'attach_type:no_link')): 0,
        ('program.translated_size', tags): 300,
        ('program.jited_size', tags): 230,
        ('program.verified_instructions', tags): 35,
        ('program.memory', tags): 12288,
    }


def test_verified_instructions_only_where_the_kernel_counts_them():
    programs = [program(1, 'old', verified_instructions=None), program(2, 'old', verified_instructions=None)]
    points = by_key(stats_metrics().points(snapshot(1.0, programs)))
    assert ('program.verified_instructions', prog_tags('old')) not in points
    assert points[('program.instances', prog_tags('old'))] == 2


def test_maps_with_the_same_name_type_and_owner_are_one_series():
    maps = [
        bpf_map(1, '.rodata', 'hash', max_entries=100, entries=10, memory_bytes=1000),
        bpf_map(2, '.rodata', 'hash', max_entries=200, entries=90, memory_bytes=3000),
    ]
    points = stats_metrics().points(snapshot(1.0, maps=maps))
    tags = map_tags('.rodata')
    assert {key: value for key, value in by_key(points).items() if key[0].startswith('map.')} == {
        ('map.instances', tags): 2,
        ('map.max_entries', tags): 300,
        ('map.memory', tags): 4000,
        ('map.entries', tags): 100,
        ('map.occupancy', tags): 0.45,  # the fullest member (90/200), not the sum (100/300)
    }


def test_different_owners_types_or_names_make_different_series():
    programs = [
        program(1, 'handler', 'kprobe', owners=(TOOL,)),
        program(2, 'handler', 'kprobe', owners=(SYSTEMD,)),
        program(3, 'handler', 'tracing', owners=(TOOL,)),
        program(4, 'other', 'kprobe', owners=(TOOL,)),
    ]
    maps = [
        bpf_map(1, 'm', owners=(TOOL,), memory_bytes=10),
        bpf_map(2, 'm', owners=(), pinned=True, memory_bytes=20),
        bpf_map(3, 'm', owners=(), pinned=False, memory_bytes=30),
    ]
    points = stats_metrics().points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {
        prog_tags('handler', 'kprobe', 'bpftool'): 1,
        prog_tags('handler', 'kprobe', 'systemd'): 1,
        prog_tags('handler', 'tracing', 'bpftool'): 1,
        prog_tags('other', 'kprobe', 'bpftool'): 1,
    }
    assert metric(points, 'map.memory') == {
        map_tags('m', owner='bpftool'): 10,
        map_tags('m', owner='pinned'): 20,
        map_tags('m', owner='kernel'): 30,
    }


# --- map entries and occupancy ---------------------------------------------------


def test_no_entries_nor_occupancy_for_maps_without_a_count():
    maps = [
        bpf_map(1, 'arr', 'array', max_entries=64, entries=None, memory_bytes=512),
        bpf_map(2, 'rb', 'ringbuf', max_entries=4096, entries=None, memory_bytes=8192),
    ]
    points = by_key(stats_metrics().points(snapshot(1.0, maps=maps)))
    assert {key: value for key, value in points.items() if key[0].startswith('map.')} == {
        ('map.instances', map_tags('arr', 'array')): 1,
        ('map.max_entries', map_tags('arr', 'array')): 64,
        ('map.memory', map_tags('arr', 'array')): 512,
        ('map.instances', map_tags('rb', 'ringbuf')): 1,
        ('map.max_entries', map_tags('rb', 'ringbuf')): 4096,
        ('map.memory', map_tags('rb', 'ringbuf')): 8192,
    }


def test_no_entries_when_one_member_of_the_group_has_no_count():
    maps = [bpf_map(1, 'h', entries=10), bpf_map(2, 'h', entries=None)]
    points = stats_metrics().points(snapshot(1.0, maps=maps))
    assert metric_names(points) == {
        'programs.unreported',
        'maps.unreported',
        'maps.total',
        'maps.memory',
        'map.instances',
        'map.max_entries',
        'map.memory',
    }
    assert metric(points, 'map.instances') == {map_tags('h'): 2}


def test_occupancy_is_the_fullest_member():
    maps = [
        bpf_map(1, 'h', max_entries=10, entries=9),
        bpf_map(2, 'h', max_entries=1000, entries=1),
        bpf_map(3, 'h', max_entries=100, entries=50),
    ]
    points = stats_metrics().points(snapshot(1.0, maps=maps))
    assert metric(points, 'map.entries') == {map_tags('h'): 60}
    assert metric(points, 'map.occupancy') == {map_tags('h'): 0.9}


def test_no_occupancy_when_max_entries_is_zero():
    maps = [bpf_map(1, 'h', max_entries=0, entries=0)]
    points = stats_metrics().points(snapshot(1.0, maps=maps))
    assert metric(points, 'map.entries') == {map_tags('h'): 0}
    assert metric(points, 'map.occupancy') == {}


def test_memory_point_omitted_when_any_member_memory_is_unknown():
    programs = [
        program(1, 'p', memory_bytes=4096),
        program(2, 'p', memory_bytes=None),
        program(3, 'q', memory_bytes=100),
    ]
    maps = [
        bpf_map(1, 'm', memory_bytes=None),
        bpf_map(2, 'm', memory_bytes=1024),
        bpf_map(3, 'n', memory_bytes=0),
    ]
    points = stats_metrics().points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.memory') == {prog_tags('q'): 100}
    assert metric(points, 'program.instances') == {prog_tags('p'): 2, prog_tags('q'): 1}
    assert metric(points, 'map.memory') == {map_tags('n'): 0}
    assert metric(points, 'map.instances') == {map_tags('m'): 2, map_tags('n'): 1}
    # Totals still count the known part.
    assert metric(points, 'programs.memory') == {('program_type:kprobe', 'owner:bpftool'): 4196}
    assert metric(points, 'maps.memory') == {('map_type:hash', 'owner:bpftool'): 1024}


# --- run time -------------------------------------------------------------------


def test_first_snapshot_gives_no_run_time_points():
    programs = [program(1, run_time_ns=10**9, run_count=1000, recursion_misses=3)]
    points = stats_metrics().points(snapshot(100.0, programs))
    assert metric_names(points) & RUN_TIME_METRICS == set()
    assert metric(points, 'program.instances') == {prog_tags(): 1}


def test_second_snapshot_gives_the_deltas():
    first = [
        program(1, 'p', run_time_ns=1_000, run_count=10, recursion_misses=1),
        program(2, 'p', run_time_ns=500, run_count=5, recursion_misses=0),
    ]
    second = [
        program(1, 'p', run_time_ns=1_500_001_000, run_count=3_010, recursion_misses=3),
        program(2, 'p', run_time_ns=500_000_500, run_count=1_005, recursion_misses=1),
    ]
    points = two_runs(first, second, interval=10.0)
    tags = prog_tags('p')
    run_time = {(p.metric, p.type, p.value) for p in points if p.metric in RUN_TIME_METRICS and p.tags == tags}
    assert run_time == {
        ('program.run_time', COUNT, 2_000_000_000),
        ('program.run_count', COUNT, 4_000),
        ('program.recursion_misses', COUNT, 3),
        ('program.average_run_time', GAUGE, 500_000.0),
        ('program.cpu_usage', GAUGE, 20.0),  # 2 s of CPU in 10 s
    }


def test_cpu_usage_uses_the_interval_between_snapshots():
    first = [program(1, run_time_ns=0, run_count=0)]
    second = [program(1, run_time_ns=250_000_000, run_count=1)]
    points = two_runs(first, second, interval=0.5)
    assert metric(points, 'program.cpu_usage') == {prog_tags(): 50.0}


def test_deltas_are_since_the_previous_run():
    acc = stats_metrics()
    acc.points(snapshot(100.0, [program(1, run_time_ns=100, run_count=1)]))
    acc.points(snapshot(110.0, [program(1, run_time_ns=1_000_000_100, run_count=11)]))
    points = acc.points(snapshot(114.0, [program(1, run_time_ns=2_000_000_100, run_count=15)]))
    assert metric(points, 'program.run_time') == {prog_tags(): 1_000_000_000}
    assert metric(points, 'program.run_count') == {prog_tags(): 4}
    assert metric(points, 'program.average_run_time') == {prog_tags(): 250_000_000.0}
    assert metric(points, 'program.cpu_usage') == {prog_tags(): 25.0}  # 1 s of CPU in the last 4 s


def test_a_program_gone_for_a_run_starts_over():
    acc = stats_metrics()
    acc.points(snapshot(0.0, [program(1, run_time_ns=1_000, run_count=1)]))
    acc.points(snapshot(10.0, [program(2, 'other')]))
    points = acc.points(snapshot(20.0, [program(1, run_time_ns=9_000, run_count=9)]))
    assert metric_names(points) & RUN_TIME_METRICS == set()
    assert metric(points, 'program.instances') == {prog_tags(): 1}


def test_a_program_new_in_the_second_snapshot_contributes_no_delta():
    first = [program(1, 'p', run_time_ns=1_000, run_count=1)]
    second = [
        program(1, 'p', run_time_ns=3_000, run_count=3),
        program(2, 'p', run_time_ns=10**12, run_count=10**6, recursion_misses=7),  # same group, new
        program(3, 'fresh', run_time_ns=10**12, run_count=10**6),  # a group of new programs only
    ]
    points = two_runs(first, second)
    assert metric(points, 'program.run_time') == {prog_tags('p'): 2_000}
    assert metric(points, 'program.run_count') == {prog_tags('p'): 2}
    assert metric(points, 'program.recursion_misses') == {prog_tags('p'): 0}
    assert metric(points, 'program.average_run_time') == {prog_tags('p'): 1_000.0}
    assert metric(points, 'program.instances') == {prog_tags('p'): 2, prog_tags('fresh'): 1}


def test_a_reloaded_program_with_a_new_id_contributes_no_delta():
    first = [program(1, 'p', run_time_ns=10**9, run_count=10)]
    second = [program(2, 'p', run_time_ns=2 * 10**9, run_count=20)]
    points = two_runs(first, second)
    assert metric_names(points) & RUN_TIME_METRICS == set()


def test_a_counter_going_backwards_gives_zero():
    first = [program(1, run_time_ns=5_000, run_count=50, recursion_misses=5)]
    second = [program(1, run_time_ns=1_000, run_count=10, recursion_misses=1)]
    points = two_runs(first, second)
    assert metric(points, 'program.run_time') == {prog_tags(): 0}
    assert metric(points, 'program.run_count') == {prog_tags(): 0}
    assert metric(points, 'program.recursion_misses') == {prog_tags(): 0}
    assert metric(points, 'program.cpu_usage') == {prog_tags(): 0.0}
    assert metric(points, 'program.average_run_time') == {}


def test_one_counter_going_backwards_leaves_the_others():
    first = [program(1, run_time_ns=5_000, run_count=50)]
    second = [program(1, run_time_ns=4_000, run_count=60)]
    points = two_runs(first, second)
    assert metric(points, 'program.run_time') == {prog_tags(): 0}
    assert metric(points, 'program.run_count') == {prog_tags(): 10}
    assert metric(points, 'program.average_run_time') == {prog_tags(): 0.0}


def test_no_average_run_time_when_the_program_did_not_run():
    first = [program(1, 'idle', run_time_ns=7_000, run_count=7), program(2, 'busy', run_time_ns=0, run_count=0)]
    second = [program(1, 'idle', run_time_ns=7_000, run_count=7), program(2, 'busy', run_time_ns=900, run_count=3)]
    points = two_runs(first, second)
    assert metric(points, 'program.run_count') == {prog_tags('idle'): 0, prog_tags('busy'): 3}
    assert metric(points, 'program.run_time') == {prog_tags('idle'): 0, prog_tags('busy'): 900}
    assert metric(points, 'program.average_run_time') == {prog_tags('busy'): 300.0}


@pytest.mark.parametrize(
    'run_time_stats, run_time_option',
    [
        pytest.param(False, True, id='no-stats-fd'),
        pytest.param(True, False, id='option-off'),
        pytest.param(False, False, id='both'),
    ],
)
def test_no_run_time_points_without_statistics(run_time_stats, run_time_option):
    first = [program(1, run_time_ns=1_000, run_count=1)]
    second = [program(1, run_time_ns=9_000, run_count=9)]
    points = two_runs(first, second, run_time_stats=run_time_stats, run_time=run_time_option)
    assert metric_names(points) & RUN_TIME_METRICS == {'program.recursion_misses'}
    assert metric(points, 'program.recursion_misses') == {prog_tags(): 0}  # counted by the kernel all the time
    assert metric(points, 'program.instances') == {prog_tags(): 1}


def test_recursion_misses_not_read_are_not_reported():
    first = [program(1, run_time_ns=1_000, run_count=1, recursion_misses=None)]
    second = [program(1, run_time_ns=9_000, run_count=9, recursion_misses=None)]
    points = two_runs(first, second, run_time_stats=False, run_time=False)
    assert metric_names(points) & RUN_TIME_METRICS == set()


def test_run_time_points_come_back_when_statistics_come_back():
    acc = stats_metrics()
    acc.points(snapshot(0.0, [program(1, run_time_ns=0, run_count=0)], run_time_stats=False))
    acc.points(snapshot(10.0, [program(1, run_time_ns=0, run_count=0)], run_time_stats=False))
    points = acc.points(snapshot(20.0, [program(1, run_time_ns=4_000, run_count=2)], run_time_stats=True))
    assert metric(points, 'program.run_time') == {prog_tags(): 4_000}
    assert metric(points, 'program.run_count') == {prog_tags(): 2}


# --- patterns -------------------------------------------------------------------


def test_name_patterns_with_none_or_empty_lists_allow_everything():
    for patterns in (NamePatterns.compile(None, None), NamePatterns.compile([], []), NamePatterns()):
        assert patterns.include == () and patterns.exclude == ()
        for name in ('', 'tcp_v4_connect', '.rodata', 'a b,c'):
            assert patterns.allows(name)


def test_name_patterns_search_anywhere_in_the_name():
    patterns = NamePatterns.compile(['tcp'], ['^x'])
    assert patterns.allows('trace_tcp_connect')
    assert not patterns.allows('udp_sendmsg')
    assert not patterns.allows('x_tcp')


def test_include_patterns_report_only_matching_names():
    programs = [program(1, 'tcp_v4'), program(2, 'tcp_v6'), program(3, 'udp_send'), program(4, 'x_tcp_y')]
    maps = [bpf_map(1, 'tcp_conns'), bpf_map(2, 'sock_map')]
    options = {'programs': NamePatterns.compile(['^tcp_', 'udp'], None), 'maps': NamePatterns.compile(['^sock'], None)}
    points = stats_metrics(**options).points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {
        prog_tags('tcp_v4'): 1,
        prog_tags('tcp_v6'): 1,
        prog_tags('udp_send'): 1,
    }
    assert metric(points, 'map.instances') == {map_tags('sock_map'): 1}
    assert metric(points, 'programs.unreported') == {(): 0}  # left out by a pattern is not "unreported"
    assert metric(points, 'maps.unreported') == {(): 0}


def test_exclude_patterns_leave_out_matching_names():
    programs = [program(1, 'tcp_v4'), program(2, 'tcp_v6'), program(3, 'udp_send')]
    maps = [bpf_map(1, '.rodata'), bpf_map(2, '.bss'), bpf_map(3, 'conns')]
    options = {'programs': NamePatterns.compile(None, ['v6$']), 'maps': NamePatterns.compile(None, [r'^\.'])}
    points = stats_metrics(**options).points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {prog_tags('tcp_v4'): 1, prog_tags('udp_send'): 1}
    assert metric(points, 'map.instances') == {map_tags('conns'): 1}


def test_include_and_exclude_patterns_together():
    programs = [program(1, 'tcp_v4'), program(2, 'tcp_v6'), program(3, 'udp_send')]
    options = {'programs': NamePatterns.compile(['^tcp'], ['v6'])}
    points = stats_metrics(**options).points(snapshot(1.0, programs))
    assert metric(points, 'program.instances') == {prog_tags('tcp_v4'): 1}


def test_program_patterns_do_not_apply_to_maps_and_back():
    programs = [program(1, 'same')]
    maps = [bpf_map(1, 'same')]
    options = {'programs': NamePatterns.compile(None, ['same'])}
    points = stats_metrics(**options).points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {}
    assert metric(points, 'map.instances') == {map_tags('same'): 1}


def test_exclude_own_objects_removes_own_series_but_totals_keep_them():
    programs = [program(1, 'theirs'), program(2, 'ours', owners=(AGENT,)), program(3, 'shared', owners=(TOOL, AGENT))]
    maps = [bpf_map(1, 'theirs'), bpf_map(2, 'ours', owners=(AGENT,), memory_bytes=2048)]
    points = stats_metrics(exclude_own_objects=True).points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {prog_tags('theirs'): 1}
    assert metric(points, 'map.instances') == {map_tags('theirs'): 1}
    assert metric(points, 'programs.total') == {
        ('program_type:kprobe', 'owner:bpftool'): 1,
        ('program_type:kprobe', 'owner:agent', SELF_TAG): 1,
        ('program_type:kprobe', 'owner:bpftool', SELF_TAG): 1,
    }
    assert metric(points, 'maps.memory') == {
        ('map_type:hash', 'owner:bpftool'): 1024,
        ('map_type:hash', 'owner:agent', SELF_TAG): 2048,
    }
    assert metric(points, 'programs.unreported') == {(): 0}


def test_own_objects_are_reported_by_default():
    programs = [program(1, 'ours', owners=(AGENT,))]
    points = stats_metrics().points(snapshot(1.0, programs))
    assert metric(points, 'program.instances') == {prog_tags('ours', owner='agent', own=True): 1}


# --- limits ---------------------------------------------------------------------


def test_max_programs_keeps_the_groups_with_the_most_run_time():
    first = [
        program(1, 'a', run_time_ns=0, memory_bytes=100),
        program(2, 'b', run_time_ns=0, memory_bytes=10),
        program(3, 'c', run_time_ns=0, memory_bytes=99_999),
        program(4, 'd', run_time_ns=0, memory_bytes=50),
        program(5, 'd', run_time_ns=0, memory_bytes=50),
    ]
    second = [
        program(1, 'a', run_time_ns=500, memory_bytes=100),
        program(2, 'b', run_time_ns=1_000, memory_bytes=10),
        program(3, 'c', run_time_ns=0, memory_bytes=99_999),
        program(4, 'd', run_time_ns=0, memory_bytes=50),
        program(5, 'd', run_time_ns=0, memory_bytes=50),
    ]
    points = two_runs(first, second, max_programs=2)
    assert metric(points, 'program.instances') == {prog_tags('b'): 1, prog_tags('a'): 1}
    assert metric(points, 'programs.unreported') == {(): 3}  # c, and both programs of d
    assert metric(points, 'programs.total') == {('program_type:kprobe', 'owner:bpftool'): 5}


def test_max_programs_ranks_by_memory_when_run_time_is_equal():
    programs = [
        program(1, 'small', memory_bytes=10),
        program(2, 'big', memory_bytes=5_000),
        program(3, 'pair', memory_bytes=3_000),
        program(4, 'pair', memory_bytes=3_000),  # 6000 together
        program(5, 'unknown', memory_bytes=None),
    ]
    points = stats_metrics(max_programs=2).points(snapshot(1.0, programs))
    assert metric(points, 'program.instances') == {prog_tags('pair'): 2, prog_tags('big'): 1}
    assert metric(points, 'programs.unreported') == {(): 2}


def test_max_maps_keeps_the_largest_groups():
    maps = [
        bpf_map(1, 'small', memory_bytes=100),
        bpf_map(2, 'big', memory_bytes=10_000),
        bpf_map(3, '.rodata', memory_bytes=4_000),
        bpf_map(4, '.rodata', memory_bytes=4_000),
        bpf_map(5, '.rodata', memory_bytes=4_000),  # 12000 together: the largest group
        bpf_map(6, 'unknown', memory_bytes=None),
    ]
    points = stats_metrics(max_maps=2).points(snapshot(1.0, maps=maps))
    assert metric(points, 'map.instances') == {map_tags('.rodata'): 3, map_tags('big'): 1}
    assert metric(points, 'maps.unreported') == {(): 2}
    assert metric(points, 'maps.total') == {('map_type:hash', 'owner:bpftool'): 6}


def test_limits_at_or_above_the_group_count_report_everything():
    programs = [program(1, 'a'), program(2, 'b'), program(3, 'b')]
    maps = [bpf_map(1, 'a'), bpf_map(2, 'a')]
    points = stats_metrics(max_programs=2, max_maps=1).points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {prog_tags('a'): 1, prog_tags('b'): 2}
    assert metric(points, 'map.instances') == {map_tags('a'): 2}
    assert metric(points, 'programs.unreported') == {(): 0}
    assert metric(points, 'maps.unreported') == {(): 0}


def test_max_zero_reports_no_series():
    programs = [program(1, 'a'), program(2, 'b'), program(3, 'b'), program(4, 'skip')]
    maps = [bpf_map(1, 'a'), bpf_map(2, 'a'), bpf_map(3, 'c')]
    options = {'max_programs': 0, 'max_maps': 0, 'programs': NamePatterns.compile(None, ['skip'])}
    acc = stats_metrics(**options)
    acc.points(snapshot(0.0, programs, maps))
    points = acc.points(snapshot(10.0, programs, maps))
    assert {p.metric for p in points if p.metric.startswith(('program.', 'map.'))} == set()
    assert metric(points, 'programs.unreported') == {(): 3}  # 'skip' was left out by the pattern
    assert metric(points, 'maps.unreported') == {(): 3}


# --- hostile names --------------------------------------------------------------


def test_hostile_names_are_sanitized_tags():
    programs = [program(1, 'evil\nprog|x', 'kprobe', owners=(Owner(9, 'c#md, x'),))]
    maps = [
        bpf_map(1, 'my map,x', 'hash'),
        bpf_map(2, 'my,map x', 'hash'),  # the same tag: the same series
        bpf_map(3, ' , ', 'hash'),
    ]
    points = stats_metrics().points(snapshot(1.0, programs, maps))
    assert metric(points, 'program.instances') == {
        ('program_name:evil_prog_x', 'program_type:kprobe', 'owner:c_md_x'): 1
    }
    assert metric(points, 'map.instances') == {map_tags('my_map_x'): 2, map_tags('unknown'): 1}
    assert formatting.tag('map_name', 'my map,x') == 'map_name:my_map_x'
    assert metric(points, 'programs.total') == {('program_type:kprobe', 'owner:c_md_x'): 1}


def test_long_names_are_bounded_like_every_tag():
    name = 'n' * 500
    points = stats_metrics().points(snapshot(1.0, maps=[bpf_map(1, name)]))
    [tags] = metric(points, 'map.instances')
    assert tags[0] == formatting.tag('map_name', name)
    assert len(tags[0]) == formatting.MAX_TAG_LENGTH


# --- property -------------------------------------------------------------------

owners_strategy = st.lists(
    st.sampled_from([SYSTEMD, TOOL, AGENT, Owner(7, 'a b'), Owner(8, '')]), max_size=3, unique=True
).map(lambda owners: tuple(sorted(owners)))

map_strategy = st.builds(
    lambda name, type, owners, pinned, memory, max_entries, entries: (
        name,
        type,
        owners,
        pinned,
        memory,
        max_entries,
        entries,
    ),
    st.text(alphabet='ab ,|#\n.', max_size=4),
    st.sampled_from(['hash', 'array', 'ringbuf', 'lru hash']),
    owners_strategy,
    st.booleans(),
    st.none() | st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=1_000),
    st.none() | st.integers(min_value=0, max_value=1_000),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(map_strategy, max_size=40))
def test_map_totals_and_instances_count_every_map(specs):
    maps = [
        bpf_map(
            i,
            name,
            type,
            owners=owners,
            pinned=pinned,
            memory_bytes=memory,
            max_entries=max_entries,
            entries=entries,
        )
        for i, (name, type, owners, pinned, memory, max_entries, entries) in enumerate(specs)
    ]
    points = stats_metrics(max_maps=10**6).points(snapshot(1.0, maps=maps))
    assert sum(metric(points, 'maps.total').values()) == len(maps)
    assert sum(metric(points, 'maps.memory').values()) == sum(m.memory_bytes or 0 for m in maps)
    assert sum(metric(points, 'map.instances').values()) == len(maps)
    assert sum(metric(points, 'map.max_entries').values()) == sum(m.max_entries for m in maps)
    assert metric(points, 'maps.unreported') == {(): 0}


# --- ring buffers and memory charged to cgroups ---------------------------------------------------


def ring(id, name='events', used=0, size=4096, **overrides) -> MapRecord:
    return bpf_map(id, name, 'ringbuf', max_entries=size, entries=None, ring_buffer_used=used, **overrides)


def test_a_ring_buffers_fill_is_its_unread_bytes_over_its_size_the_fullest_of_a_series():
    points = stats_metrics().points(snapshot(0, maps=[ring(1, used=1024), ring(2, used=3072)]))
    tags = ('map_name:events', 'map_type:ringbuf', 'owner:bpftool')
    assert metric(points, 'map.ring_buffer.used') == {tags: 4096}
    assert metric(points, 'map.ring_buffer.fill') == {tags: 0.75}
    assert metric(points, 'map.entries') == {}


def test_ring_buffers_are_reported_whatever_max_maps():
    maps = [bpf_map(i, f'big{i}', memory_bytes=10**6) for i in range(1, 4)] + [ring(10, used=2048)]
    points = stats_metrics(max_maps=1).points(snapshot(0, maps=maps))
    assert metric(points, 'map.ring_buffer.fill') == {('map_name:events', 'map_type:ringbuf', 'owner:bpftool'): 0.5}
    assert len(metric(points, 'map.instances')) == 2  # the ring buffer and the largest other map
    assert metric(points, 'maps.unreported') == {(): 2}


def test_maps_that_are_not_ring_buffers_have_no_fill():
    points = stats_metrics().points(snapshot(0, maps=[bpf_map(1)]))
    assert not metric_names(points) & {'map.ring_buffer.used', 'map.ring_buffer.fill'}


CONTAINER_PATH = '/kubepods/burstable/pod1b2c3d4e-0000-1111-2222-333344445555/' + 'ab' * 32


def test_map_memory_is_summed_per_memory_cgroup_it_is_charged_to():
    maps = [
        bpf_map(1, memory_bytes=1000, memory_cgroup_id=7),
        bpf_map(2, memory_bytes=500, memory_cgroup_id=7),
        bpf_map(3, memory_bytes=300, memory_cgroup_id=9),
        bpf_map(4, memory_bytes=200, memory_cgroup_id=0),  # the root's: counted against no limit
        bpf_map(5, memory_bytes=100, memory_cgroup_id=None),  # a kernel that does not charge maps
        bpf_map(6, memory_bytes=50, memory_cgroup_id=11),
    ]
    cgroups = {7: '/system.slice/cilium.service', 9: CONTAINER_PATH, 11: None}
    seen = []

    def agent_tags(container, cardinality):
        seen.append((container.id, cardinality))
        return ['kube_namespace:kube-system']

    metrics = stats_metrics(cardinality='high', container_tags=agent_tags)
    points = metrics.points(EbpfSnapshot(0, [], maps, None, cgroups))
    assert metric(points, 'maps.charged_memory') == {
        ('cgroup_name:cilium.service',): 1500,
        (
            'container_runtime:kubernetes',
            'kube_qos:burstable',
            'pod_uid:1b2c3d4e-0000-1111-2222-333344445555',
            'container_id:' + 'ab' * 32,
            'cgroup_name:' + 'ab' * 32,
            'kube_namespace:kube-system',
        ): 300,
        ('memory_cgroup:not_visible',): 50,
    }
    assert seen == [('ab' * 32, 'high')]


def test_at_low_cardinality_a_containers_charged_memory_has_no_container_id():
    maps = [bpf_map(1, memory_bytes=1000, memory_cgroup_id=9)]
    points = stats_metrics().points(EbpfSnapshot(0, [], maps, None, {9: CONTAINER_PATH}))
    assert metric(points, 'maps.charged_memory') == {('container_runtime:kubernetes', 'kube_qos:burstable'): 1000}


# --- attachments -------------------------------------------------------------------


def test_attachments_are_counted_by_type_and_target_with_targets_bounded():
    from datadog_checks.ebpf_probe.ebpf_stats.attachments import Attachment
    from datadog_checks.ebpf_probe.ebpf_stats.metrics import MAX_ATTACH_TARGETS

    functions = [Attachment('kprobe', f'func_{i:02}') for i in range(MAX_ATTACH_TARGETS + 5)]
    programs = [
        program(1, 'tracer', attachments=(*functions, Attachment('cgroup', '/system.slice', 'cgroup_inet_ingress'))),
        program(2, 'tracer', attachments=(Attachment('kprobe', 'func_00'),)),
        program(3, 'idle'),
    ]
    points = metric(stats_metrics().points(snapshot(1.0, programs)), 'program.attachments')
    tracer = prog_tags('tracer')
    expected = {(*tracer, 'attach_type:cgroup_inet_ingress', 'attach_target:/system.slice'): 1}
    expected[(*tracer, 'attach_type:kprobe', 'attach_target:func_00')] = 2  # two programs of the series
    for i in range(1, MAX_ATTACH_TARGETS - 1):
        expected[(*tracer, 'attach_type:kprobe', f'attach_target:func_{i:02}')] = 1
    expected[(*tracer, 'attach_type:kprobe', 'attach_target:other')] = 6  # beyond the first targets
    expected[(*prog_tags('idle'), 'attach_type:no_link')] = 0
    assert points == expected


# --- owners' containers ---------------------------------------------------------------------------

POD_A = '/kubepods/burstable/pod1b2c3d4e-0000-1111-2222-33334444aaaa/' + 'aa' * 32
POD_B = '/kubepods/burstable/pod1b2c3d4e-0000-1111-2222-33334444bbbb/' + 'bb' * 32


def test_owners_of_one_name_in_two_pods_are_two_series_at_orchestrator_cardinality():
    maps = [
        bpf_map(1, 'policy', owners=(Owner(10, 'cilium-agent', 7),)),
        bpf_map(2, 'policy', owners=(Owner(20, 'cilium-agent', 8),)),
    ]
    cgroups = {7: POD_A, 8: POD_B}
    points = stats_metrics(cardinality='orchestrator').points(EbpfSnapshot(0, [], maps, None, cgroups))
    owner = (
        'map_name:policy',
        'map_type:hash',
        'owner:cilium-agent',
        'container_runtime:kubernetes',
        'kube_qos:burstable',
    )
    assert metric(points, 'map.instances') == {
        (*owner, 'pod_uid:1b2c3d4e-0000-1111-2222-33334444aaaa'): 1,
        (*owner, 'pod_uid:1b2c3d4e-0000-1111-2222-33334444bbbb'): 1,
    }


def test_an_owner_on_the_host_is_tagged_with_its_service_and_the_agents_tags_come_from_its_tagger():
    programs = [
        program(1, 'probe', owners=(Owner(10, 'falco', 7),)),
        program(2, 'probe2', owners=(Owner(11, 'bash', 9),)),  # a session: no service
        program(3, 'probe3', owners=(Owner(12, 'tool', 0),)),  # cgroup not known
        program(4, 'probe4', owners=(Owner(13, 'agent', 8),)),
    ]
    cgroups = {7: '/system.slice/falco.service', 9: '/user.slice/user-0.slice/session-3.scope', 8: POD_A}
    metrics = stats_metrics(container_tags=lambda container, cardinality: ['kube_namespace:datadog'])
    points = metric(metrics.points(EbpfSnapshot(0, programs, [], None, cgroups)), 'program.instances')
    assert set(points) == {
        ('program_name:probe', 'program_type:kprobe', 'owner:falco', 'owner_service:falco.service'),
        ('program_name:probe2', 'program_type:kprobe', 'owner:bash'),
        ('program_name:probe3', 'program_type:kprobe', 'owner:tool'),
        ('program_name:probe4', 'program_type:kprobe', 'owner:agent', 'container_runtime:kubernetes',
         'kube_qos:burstable', 'kube_namespace:datadog'),
    }  # fmt: skip
