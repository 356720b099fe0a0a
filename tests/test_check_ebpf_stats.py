# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The check's eBPF stats metrics for objects we made, against the kernel and bpftool."""

import time

import pytest

from datadog_checks.base import AgentCheck
from datadog_checks.dev.utils import get_metadata_metrics, get_service_checks
from datadog_checks.ebpf_probe import EbpfProbeCheck

from . import kernels
from .bpf_objects import OWNER_COMM, bpftool, counted_with_statistics_off, held_by_me, make_test_objects
from .seams import StatisticsWindows

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

ME = OWNER_COMM
KERNEL = kernels.current()
INSTANCE = {'collect_oom_kill': False, 'tags': ['team:kernel']}
# Run-time statistics on all the time: exact counts, to compare with bpftool and known numbers of runs.
HELD = {**INSTANCE, 'program_runtime_sampling': 1}


@pytest.fixture(scope='module')
def objects():
    objects = make_test_objects()
    yield objects
    objects.close()


def run_twice(dd_run_check, aggregator, check, between=None):
    dd_run_check(check)
    # libbpf's feature probes at load leave maps the kernel frees an RCU grace period later.
    time.sleep(0.5)
    if between:
        between()
    aggregator.reset()
    dd_run_check(check)


def test_maps_and_programs_we_made_are_reported_with_bpftools_figures(dd_run_check, aggregator, objects):
    check = EbpfProbeCheck('ebpf_probe', {}, [HELD])
    try:
        run_twice(dd_run_check, aggregator, check, between=lambda: objects.run_program(1000))
        shown_maps = {m['id']: m for m in bpftool('map', 'show')}
        expected_types = {'hash': 'hash', 'lru': 'lru_hash', 'pcpu': 'percpu_hash', 'array': 'array',
                          'ringbuf': 'ringbuf', 'big': 'hash', 'inner': 'hash', 'hmap': 'hash_of_maps'}  # fmt: skip
        for kind, made in objects.maps.items():
            tags = [f'map_name:{made.name}', f'map_type:{expected_types[kind]}', f'owner:{ME}', 'team:kernel']
            aggregator.assert_metric('ebpf_probe.map.instances', value=1, count=1, tags=tags)
            aggregator.assert_metric('ebpf_probe.map.max_entries', value=made.max_entries, count=1, tags=tags)
            aggregator.assert_metric(
                'ebpf_probe.map.memory', value=shown_maps[made.id]['bytes_memlock'], count=1, tags=tags
            )
            if made.entries is None:
                aggregator.assert_metric('ebpf_probe.map.entries', count=0, tags=tags)
                aggregator.assert_metric('ebpf_probe.map.occupancy', count=0, tags=tags)
            else:
                aggregator.assert_metric('ebpf_probe.map.entries', value=made.entries, count=1, tags=tags)
                aggregator.assert_metric(
                    'ebpf_probe.map.occupancy', value=made.entries / made.max_entries, count=1, tags=tags
                )

        [shown] = [p for p in bpftool('prog', 'show') if p['id'] == objects.program_id]
        tags = [f'program_name:{objects.program_name}', 'program_type:socket_filter', f'owner:{ME}', 'team:kernel']
        aggregator.assert_metric('ebpf_probe.program.run_count', value=1000, count=1, tags=tags)
        [run_time] = [m for m in aggregator.metrics('ebpf_probe.program.run_time') if m.tags == tags]
        assert run_time.value > 0
        [average] = [m for m in aggregator.metrics('ebpf_probe.program.average_run_time') if m.tags == tags]
        assert average.value == pytest.approx(run_time.value / 1000)
        [cpu] = [m for m in aggregator.metrics('ebpf_probe.program.cpu_usage') if m.tags == tags]
        assert 0 < cpu.value < 100
        for metric, value in (
            ('run_time', run_time.value),
            ('average_run_time', average.value),
            ('cpu_usage', cpu.value),
        ):
            aggregator.assert_metric(f'ebpf_probe.program.{metric}', value=value, count=1, tags=tags)
        aggregator.assert_metric('ebpf_probe.program.instances', value=1, count=1, tags=tags)
        aggregator.assert_metric('ebpf_probe.program.recursion_misses', value=0, count=1, tags=tags)
        aggregator.assert_metric('ebpf_probe.program.translated_size', value=shown['bytes_xlated'], tags=tags)
        aggregator.assert_metric('ebpf_probe.program.jited_size', value=shown['bytes_jited'], tags=tags)
        aggregator.assert_metric('ebpf_probe.program.memory', value=shown['bytes_memlock'], tags=tags)
        if KERNEL is not None and not KERNEL.verified_instructions:  # not counted before 5.16: not sent
            aggregator.assert_metric('ebpf_probe.program.verified_instructions', count=0, tags=tags)
        else:
            aggregator.assert_metric('ebpf_probe.program.verified_instructions', value=2, tags=tags)

        # The check's own iterators are there too, marked as its own.
        # Its iterators, and the element iterator's program where it counts maps one by one (loaded
        # once, attached to each map in turn); bpf_for_each_map_elem's, loaded per large map, may not
        # be freed yet.
        own = [m for m in aggregator.metrics('ebpf_probe.program.instances') if 'ebpf_probe_self:true' in m.tags]
        names = {t.removeprefix('program_name:') for m in own for t in m.tags if t.startswith('program_name:')}
        loaded = set(held_by_me().values())  # as the kernel shows them
        assert loaded and loaded <= names <= loaded | {'count_with_for_'}

        # Totals count every object bpftool lists.
        totals = aggregator.metrics('ebpf_probe.programs.total')
        assert sum(m.value for m in totals) == len(bpftool('prog', 'show'))
        assert sum(m.value for m in aggregator.metrics('ebpf_probe.maps.total')) == len(bpftool('map', 'show'))
        aggregator.assert_metric('ebpf_probe.maps.total', value=3, tags=['map_type:hash', f'owner:{ME}', 'team:kernel'])
        # Memory in all, as bpftool adds it up; every object within the series limits.
        for kind, listed in (('program', bpftool('prog', 'show')), ('map', bpftool('map', 'show'))):
            submitted = aggregator.metrics(f'ebpf_probe.{kind}s.memory')
            assert sum(m.value for m in submitted) == sum(o['bytes_memlock'] for o in listed), kind
            for point in submitted:
                aggregator.assert_metric(f'ebpf_probe.{kind}s.memory', value=point.value, tags=point.tags)
            aggregator.assert_metric(f'ebpf_probe.{kind}s.unreported', value=0, count=1, tags=['team:kernel'])
        aggregator.assert_metric(
            'ebpf_probe.programs.total', value=1, tags=['program_type:socket_filter', f'owner:{ME}', 'team:kernel']
        )
        aggregator.assert_service_check(
            'ebpf_probe.probe.can_load', AgentCheck.OK, tags=['probe:ebpf_stats', 'team:kernel']
        )
        # Where programs are attached: the fixture's socket filter by no link, the check's iterators each
        # by one; where maps are counted one by one, the element iterator's program is linked to a map only
        # while it walks it, and between walks no link holds it.
        aggregator.assert_metric(
            'ebpf_probe.program.attachments', value=0, count=1, tags=[*tags, 'attach_type:no_link']
        )
        attached = aggregator.metrics('ebpf_probe.program.attachments')
        kinds = {
            t for m in attached if 'ebpf_probe_self:true' in m.tags for t in m.tags if t.startswith('attach_type:')
        }
        if KERNEL is not None and KERNEL.entry_counting == 'iterator':
            assert kinds == {'attach_type:iterator'}
        else:
            assert kinds in ({'attach_type:iterator'}, {'attach_type:iterator', 'attach_type:no_link'})
        # The fixture's ring buffer, which nothing writes to.
        ring = [f'map_name:{objects.maps["ringbuf"].name}', 'map_type:ringbuf', f'owner:{ME}', 'team:kernel']
        aggregator.assert_metric('ebpf_probe.map.ring_buffer.used', value=0, count=1, tags=ring)
        aggregator.assert_metric('ebpf_probe.map.ring_buffer.fill', value=0, count=1, tags=ring)
        # What the other objects of the host give (the tests of these metrics are test_attachments.py,
        # test_ring_buffers.py and test_map_memory_cgroups.py): in series of their own, with a value.
        for name in ('program.attachments', 'map.ring_buffer.used', 'map.ring_buffer.fill', 'maps.charged_memory'):
            for point in aggregator.metrics(f'ebpf_probe.{name}'):
                assert point.value >= 0
                aggregator.assert_metric(f'ebpf_probe.{name}', value=point.value, tags=point.tags)
        aggregator.assert_service_checks(get_service_checks())
        aggregator.assert_metrics_using_metadata(get_metadata_metrics(), check_submission_type=True)
        aggregator.assert_no_duplicate_metrics()
        aggregator.assert_all_metrics_covered()
    finally:
        check.cancel()


def test_first_run_has_no_run_time_yet(dd_run_check, aggregator, objects):
    check = EbpfProbeCheck('ebpf_probe', {}, [INSTANCE])
    try:
        dd_run_check(check)
        assert aggregator.metrics('ebpf_probe.program.run_count') == []
        assert aggregator.metrics('ebpf_probe.program.instances')
    finally:
        check.cancel()


def test_own_objects_can_be_excluded_but_stay_in_the_totals(dd_run_check, aggregator, objects):
    check = EbpfProbeCheck('ebpf_probe', {}, [{**INSTANCE, 'exclude_own_objects': True}])
    try:
        dd_run_check(check)
        for name in ('ebpf_probe.program.instances', 'ebpf_probe.map.instances'):
            assert not [m for m in aggregator.metrics(name) if 'ebpf_probe_self:true' in m.tags]
        assert [m for m in aggregator.metrics('ebpf_probe.programs.total') if 'ebpf_probe_self:true' in m.tags]
    finally:
        check.cancel()


def test_name_patterns_and_limits_bound_the_series(dd_run_check, aggregator, objects):
    instance = {**INSTANCE, 'map_name_include': [f'^{objects.prefix}_'], 'map_name_exclude': ['_ringbuf$'],
                'program_name_include': ['^nothing-matches$'], 'max_maps_reported': 2}  # fmt: skip
    check = EbpfProbeCheck('ebpf_probe', {}, [instance])
    try:
        dd_run_check(check)
        reported = aggregator.metrics('ebpf_probe.map.instances')
        # Seven of our maps match; the two largest (by memory) are reported, the rest counted.
        assert len(reported) == 2
        assert all(t.startswith(f'map_name:{objects.prefix}_') for m in reported for t in m.tags if 'map_name' in t)
        assert f'map_name:{objects.maps["big"].name}' in {t for m in reported for t in m.tags}
        aggregator.assert_metric('ebpf_probe.maps.unreported', value=5, tags=['team:kernel'])
        assert aggregator.metrics('ebpf_probe.program.instances') == []
        aggregator.assert_metric('ebpf_probe.programs.unreported', value=0, tags=['team:kernel'])
    finally:
        check.cancel()


def test_without_cap_sys_admin_the_stats_probe_says_so(dd_run_check, aggregator, monkeypatch):
    from datadog_checks.ebpf_probe.kernel import requirements as kernel

    monkeypatch.setattr(kernel, 'effective_capabilities', lambda: (1 << kernel.CAP_BPF) | (1 << kernel.CAP_PERFMON))
    check = EbpfProbeCheck('ebpf_probe', {}, [INSTANCE])
    dd_run_check(check)
    [sc] = aggregator.service_checks('ebpf_probe.probe.can_load')
    assert sc.status == AgentCheck.WARNING  # optional, and not granted: not a fault
    assert sc.message.startswith('missing capability CAP_SYS_ADMIN')
    assert sc.message.endswith('grant it, or set collect_ebpf_stats: false to collect OOM kills only')
    assert aggregator.metric_names == []
    # Not a crash: the slot keeps the reason and tries again later.
    assert check._ebpf_stats.probe is None and check._ebpf_stats.error == sc.message


def test_without_the_iterators_the_rest_works_and_the_check_says_so_once(
    dd_run_check, aggregator, objects, monkeypatch, caplog
):
    from datadog_checks.ebpf_probe.ebpf_stats import probe as ebpf_stats

    monkeypatch.setattr(ebpf_stats, 'STATS_OBJECT', 'missing-iterators.bpf.o')
    check = EbpfProbeCheck('ebpf_probe', {}, [INSTANCE])
    try:
        for _ in range(3):
            dd_run_check(check)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
        assert len(warnings) == len(set(warnings))  # each said once, not every run
        [missing] = [w for w in warnings if 'the BPF iterators are not loaded' in w]
        assert 'missing-iterators.bpf.o' in missing
        assert check.warnings == warnings  # shown in the Agent's status too
        sc = aggregator.service_checks('ebpf_probe.probe.can_load')[-1]
        assert sc.status == AgentCheck.OK
        # Entries still come, counted map by map; owners from /proc.
        big = objects.maps['big']
        tags = [f'map_name:{big.name}', 'map_type:hash', f'owner:{ME}', 'team:kernel']
        aggregator.assert_metric('ebpf_probe.map.entries', value=big.entries, tags=tags)
    finally:
        check.cancel()


def paced_interval(check, dd_run_check, aggregator, objects, seconds):
    """Two runs `seconds` apart while the fixture runs its program at a steady rate: the runs made
    between them, and the shortest and longest the check's interval can have been."""
    outer = time.monotonic()
    dd_run_check(check)
    inner = time.monotonic()
    before = objects.paced_runs()
    time.sleep(seconds)
    aggregator.reset()
    shortest = time.monotonic() - inner
    dd_run_check(check)
    return objects.paced_runs() - before, shortest, time.monotonic() - outer


def program_series(aggregator, objects, metric):
    tags = [f'program_name:{objects.program_name}', 'program_type:socket_filter', f'owner:{ME}', 'team:kernel']
    return [m.value for m in aggregator.metrics(f'ebpf_probe.program.{metric}') if m.tags == tags]


def test_run_time_at_defaults_is_there_and_scaled_to_the_interval(dd_run_check, aggregator, objects, monkeypatch):
    """Statistics on for 5% of the interval (the default), the figures scaled to all of it.

    Asserted as what holds however a (possibly emulated, busy) CPU schedules the windows and the
    workload: how close the scaled figures come to a steady workload is measured by make bench.
    """
    check = EbpfProbeCheck('ebpf_probe', {}, [{**INSTANCE, 'min_collection_interval': 2}])
    windows = StatisticsWindows(monkeypatch)
    objects.start_pacing(20, 5)  # 4,000 runs a second
    try:
        made, shortest, longest = paced_interval(check, dd_run_check, aggregator, objects, 2.0)
        probe = check._ebpf_stats.probe
        if probe.run_time_source == 'external':  # counters moved outside our windows: whose doing?
            counted_with_statistics_off(mine_allowed=True)
        assert probe.run_time_source == 'sampled'
        assert windows.opened >= 1 and windows.closed >= 1  # the first one opens right after the first run
        [runs] = program_series(aggregator, objects, 'run_count')
        [run_time] = program_series(aggregator, objects, 'run_time')
        assert made > 0 and runs >= 0 and run_time >= 0
        if runs:
            [average] = program_series(aggregator, objects, 'average_run_time')
            assert average == pytest.approx(run_time / runs, rel=0.01)
        [cpu] = program_series(aggregator, objects, 'cpu_usage')
        # CPU use is the scaled run time over the interval, whatever its length turned out to be.
        assert 100 * run_time / (longest * 1e9) * 0.99 <= cpu <= 100 * run_time / (shortest * 1e9) * 1.01
    finally:
        objects.stop_pacing()
        check.cancel()


def test_collect_program_runtime_false_never_turns_statistics_on(dd_run_check, aggregator, objects, monkeypatch):
    check = EbpfProbeCheck('ebpf_probe', {}, [{**INSTANCE, 'collect_program_runtime': False}])
    windows = StatisticsWindows(monkeypatch)
    try:
        dd_run_check(check)
        before = objects.program_run_count()
        objects.run_program(1000)
        time.sleep(0.2)
        dd_run_check(check)
        if objects.program_run_count() != before:
            counted_with_statistics_off()
        assert objects.program_run_count() == before  # the kernel never counted: no statistics, no tax
        assert aggregator.metrics('ebpf_probe.program.run_count') == []
        assert windows.opened == 0
        # Recursion misses the kernel counts all the time: reported all the same, where the program
        # iterator reads them (5.19+; before, only with run time, which pays an fd per program).
        tags = [f'program_name:{objects.program_name}', 'program_type:socket_filter', f'owner:{ME}', 'team:kernel']
        if KERNEL is None or KERNEL.run_counters_in_iterator:
            aggregator.assert_metric('ebpf_probe.program.recursion_misses', value=0, count=1, tags=tags)
        else:
            aggregator.assert_metric('ebpf_probe.program.recursion_misses', count=0, tags=tags)
    finally:
        check.cancel()


@pytest.mark.parametrize('sampling', [0.05, 1])
def test_the_sampling_option_reaches_the_probe(dd_run_check, sampling):
    check = EbpfProbeCheck('ebpf_probe', {}, [{**INSTANCE, 'program_runtime_sampling': sampling}])
    try:
        dd_run_check(check)
        hook = check._ebpf_stats.probe.hooks[0]
        assert hook == ('BPF_ENABLE_STATS' if sampling == 1 else 'BPF_ENABLE_STATS 5% of the time')
    finally:
        check.cancel()


@pytest.mark.parametrize('sampling', [0, 1.5, 'half'])
def test_a_wrong_sampling_is_a_configuration_error(dd_run_check, sampling):
    check = EbpfProbeCheck('ebpf_probe', {}, [{**INSTANCE, 'program_runtime_sampling': sampling}])
    with pytest.raises(Exception, match='program_runtime_sampling'):
        dd_run_check(check)
