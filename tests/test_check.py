# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The Agent check: what it submits for real OOM kills, and how it behaves when it cannot load."""

import logging

import pytest

from datadog_checks.base import AgentCheck
from datadog_checks.dev.utils import get_metadata_metrics
from datadog_checks.ebpf_probe import EbpfProbeCheck, lifecycle
from datadog_checks.ebpf_probe import check as check_module
from datadog_checks.ebpf_probe.lifecycle import ProbeLoadError

from .bpf_objects import held_by_me
from .kernel_report import KernelLog

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

CAN_LOAD = 'ebpf_probe.probe.can_load'


def make_check(instance):
    return EbpfProbeCheck('ebpf_probe', {}, [instance])


@pytest.mark.oom
@pytest.mark.parametrize(
    'variant_options, variant',
    [
        pytest.param({'enable_core': True, 'allow_runtime_compiled_fallback': False}, 'co-re', id='co-re'),
        pytest.param({'enable_core': False}, 'bcc', id='bcc', marks=pytest.mark.bcc),
    ],
)
def test_a_real_oom_kill_is_one_metric_point_and_one_event(
    dd_run_check, aggregator, instance, memory_cgroup, variant_options, variant
):
    check = make_check({**instance, **variant_options, 'collect_ebpf_stats': False})
    try:
        dd_run_check(check)  # loads the probe
        aggregator.assert_service_check(CAN_LOAD, AgentCheck.OK, tags=['probe:oom_kill', *instance['tags']])
        hook = check._oom_kill.probe.hooks[0]
        assert check._oom_kill.probe.variant == variant
        hook = check._oom_kill.probe.hooks[0]
        assert check._oom_kill.probe.variant == variant
        aggregator.reset()

        with KernelLog(full=True) as kernel_log:
            victim = memory_cgroup.oom_kill(comm='check-victim', oom_score_adj=42)
        dd_run_check(check)
        [report] = kernel_log.oom_reports()

        expected_tags = [
            'process_name:check-victim',
            'trigger_process_name:check-victim',
            'trigger_type:cgroup',
            f'cgroup_name:{memory_cgroup.name}',
            'killer:kernel',
            'killer_type:kernel',
            *instance['tags'],
        ]
        aggregator.assert_metric('ebpf_probe.oom_kill.count', value=1, count=1, tags=expected_tags)
        aggregator.assert_metric('ebpf_probe.oom_kill.dropped', value=0, count=1, tags=instance['tags'])
        aggregator.assert_metric('ebpf_probe.oom_kill.unaccounted', value=0, count=1, tags=instance['tags'])
        aggregator.assert_service_check(CAN_LOAD, AgentCheck.OK, count=1)

        [event] = aggregator.events
        assert event['msg_title'] == f'OOM kill: check-victim (pid {victim.pid})'
        assert event['alert_type'] == 'error'
        assert event['source_type_name'] == 'eBPF Probe'  # the manifest's (tests/test_assets.py)
        assert event['event_type'] == 'oom_kill'
        assert event['aggregation_key'] == memory_cgroup.path
        assert sorted(event['tags']) == sorted(expected_tags)
        assert victim.started - 1 <= event['timestamp'] <= victim.ended + 1
        text = event['msg_text']
        assert text.startswith('%%%') and text.endswith('%%%')
        assert f'**check\\-victim** (pid {victim.pid}, uid 0, oom_score_adj 42)' in text
        assert f'| Triggered by | **check\\-victim** (pid {victim.pid}) |' in text
        assert 'a memory cgroup reached its limit (trigger_type:cgroup)' in text
        assert f'| Memory cgroup | /{memory_cgroup.name.replace("-", chr(92) + "-")} |' in text
        # Every size in kB as the kernel printed it (whatever its page size).
        rss = report.anon_rss_kb + report.file_rss_kb + report.shmem_rss_kb
        assert (f'| Memory | rss {rss:,} kB (anon {report.anon_rss_kb:,} kB, file {report.file_rss_kb:,} kB, shmem '
                f'{report.shmem_rss_kb:,} kB), total-vm {report.total_vm_kb:,} kB, page tables {report.pgtables_kb:,} '
                'kB |') in text  # fmt: skip
        assert f' kB of a {report.limit_kb:,} kB limit |' in text
        assert f'| Seen by | {hook} |' in text

        aggregator.assert_all_metrics_covered()
        aggregator.assert_metrics_using_metadata(get_metadata_metrics())
        aggregator.assert_no_duplicate_metrics()

        aggregator.reset()
        dd_run_check(check)  # the kill is not reported twice
        assert aggregator.metrics('ebpf_probe.oom_kill.count') == []
        assert aggregator.events == []
    finally:
        check.cancel()


def test_first_run_loads_the_probe_not_the_constructor(dd_run_check, aggregator, instance):
    check = make_check(instance)
    assert check._oom_kill is None  # nothing loaded, not even configured, before the first run
    try:
        dd_run_check(check)
        assert check._oom_kill.probe is not None
        assert check._oom_kill.probe.variant == 'co-re'
    finally:
        check.cancel()
    assert check._oom_kill.probe is None


def test_cancel_is_idempotent_and_a_later_run_loads_again(dd_run_check, aggregator, instance):
    check = make_check(instance)
    dd_run_check(check)
    first = check._oom_kill.probe
    check.cancel()
    check.cancel()
    assert check._oom_kill.probe is None
    dd_run_check(check)
    assert check._oom_kill.probe is not None and check._oom_kill.probe is not first
    check.cancel()


def test_collect_nothing_loads_nothing(dd_run_check, aggregator, instance):
    check = make_check({**instance, 'collect_oom_kill': False, 'collect_ebpf_stats': False})
    dd_run_check(check)
    assert check._oom_kill is None
    assert aggregator.metric_names == []


class TestCannotLoad:
    INSTANCE = {
        'btf_path': '/nonexistent/vmlinux.btf',
        'allow_runtime_compiled_fallback': False,
        'collect_ebpf_stats': False,
        'tags': ['a:b'],
    }

    def test_service_check_is_critical_with_the_reason_and_the_check_keeps_running(self, dd_run_check, aggregator):
        check = make_check(self.INSTANCE)
        dd_run_check(check)  # does not raise
        [sc] = aggregator.service_checks(CAN_LOAD)
        assert sc.status == AgentCheck.CRITICAL
        assert sc.tags == ['probe:oom_kill', 'a:b']
        assert 'btf_path /nonexistent/vmlinux.btf does not exist' in sc.message
        assert 'allow_runtime_compiled_fallback: true' in sc.message
        assert aggregator.metrics('ebpf_probe.oom_kill.count') == []

    def test_retries_back_off_and_the_error_is_logged_once(self, dd_run_check, aggregator, caplog, monkeypatch):
        attempts = []

        def failing_loader(options, log):
            attempts.append(1)
            raise ProbeLoadError('missing capabilities CAP_BPF, CAP_PERFMON')

        monkeypatch.setattr(check_module, 'load_oom_kill_probe', failing_loader)
        clock = [1000.0]
        monkeypatch.setattr(lifecycle.time, 'monotonic', lambda: clock[0])
        check = make_check({'load_retry_max_interval': 60, 'collect_ebpf_stats': False})
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):  # same instant: one attempt, then backoff
                dd_run_check(check)
            assert len(attempts) == 1
            clock[0] += 15  # first retry after 15 s
            dd_run_check(check)
            assert len(attempts) == 2
            clock[0] += 15  # then 30 s: not yet
            dd_run_check(check)
            assert len(attempts) == 2
            clock[0] += 15
            dd_run_check(check)
            assert len(attempts) == 3
            for _ in range(3):  # capped at load_retry_max_interval
                clock[0] += 60
                dd_run_check(check)
            assert len(attempts) == 6
        criticals = aggregator.service_checks(CAN_LOAD)
        assert len(criticals) == 9 and {sc.status for sc in criticals} == {AgentCheck.CRITICAL}
        assert all(sc.message == 'missing capabilities CAP_BPF, CAP_PERFMON' for sc in criticals)
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and 'missing capabilities' in warnings[0].getMessage()
        assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.INFO)
        assert check.warnings == [warnings[0].getMessage()]


@pytest.mark.parametrize(
    'option, value',
    [
        ('enable_core', 'maybe'),
        ('allow_runtime_compiled_fallback', [1]),
        ('collect_oom_kill', {'a': 1}),
        ('mount_tracefs', 'sometimes'),
        ('btf_path', 42),
        ('max_buffered_oom_kills', 0),
        ('max_buffered_oom_kills', 'many'),
        ('load_retry_max_interval', -1),
        ('tags', 'not-a-list'),
        ('collect_ebpf_stats', 'yes please'),
        ('collect_program_runtime', [True]),
        ('exclude_own_objects', 'maybe'),
        ('program_name_include', 'not-a-list'),
        ('map_name_exclude', 42),
        ('max_programs_reported', -1),
        ('max_maps_reported', 'all'),
        ('program_name_exclude', ['(unclosed']),
        ('map_name_include', ['[z-a]']),
    ],
)
def test_a_wrong_option_is_a_configuration_error_naming_it(dd_run_check, aggregator, option, value):
    check = make_check({option: value})
    with pytest.raises(Exception, match=f'(?s)ConfigurationError.*{option}'):
        dd_run_check(check)
    assert aggregator.metric_names == []
    assert check._oom_kill is None


def test_no_way_to_load_is_a_configuration_error(dd_run_check, aggregator):
    check = make_check({'enable_core': False, 'allow_runtime_compiled_fallback': False})
    with pytest.raises(Exception, match='`enable_core` and `allow_runtime_compiled_fallback` are both false'):
        dd_run_check(check)


CONTAINER = 'c0ffee' + '0' * 58
POD_UID = '1b2c3d4e-1234-5678-9abc-def012345678'
# What the Agent's tagger gives for a container, by cardinality (each level adds to the one before).
AGENT_TAGS = {
    0: ['kube_namespace:shop', 'kube_container_name:app', 'image_name:shop/web'],
    1: ['pod_name:web-1'],
    2: ['container_name:k8s_app_web-1', f'container_id:{CONTAINER}'],
}


def container_kill():
    from datadog_checks.ebpf_probe.oom_kill import OOMKill, VictimMemory

    path = (
        '/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_1234_5678_9abc_def012345678.slice/'
        f'cri-containerd-{CONTAINER}.scope'
    )
    return OOMKill(
        timestamp=1.0, victim_pid=10, victim_tid=10, victim_comm='java', victim_uid=1000, oom_score_adj=0,
        trigger_pid=10, trigger_tid=10, trigger_comm='java', memcg_oom=True, cgroup_path=path, cgroup_id=1,
        cgroup_path_truncated=False, memory=VictimMemory(1, 2, 3, 4, 5), oom_domain_pages=None, badness_points=None,
        hook='tp_btf/mark_victim',
    )  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize(
    'instance_option, agent_option, level',
    [(None, None, 0), ('orchestrator', None, 1), ('high', None, 2), (None, 'orchestrator', 1), ('low', 'high', 0)],
    ids=['default-low', 'orchestrator', 'high', 'agent-orchestrator', 'instance-wins'],
)
def test_metric_tags_follow_the_tag_cardinality_and_events_carry_the_pod(
    aggregator, datadog_agent, monkeypatch, instance_option, agent_option, level
):
    calls = []

    def agent_tagger(entity, cardinality):
        calls.append((entity, cardinality))
        assert entity == f'container_id://{CONTAINER}'
        return [tag for lvl in range(cardinality + 1) for tag in AGENT_TAGS[lvl]]

    monkeypatch.setattr(check_module.tagger, 'tag', agent_tagger)
    if agent_option:
        monkeypatch.setitem(datadog_agent._config, 'checks_tag_cardinality', agent_option)
    instance = {'tags': ['env_name:prod']}
    if instance_option:
        instance['check_tag_cardinality'] = instance_option
    check = make_check(instance)
    check.run_check_initializations()
    check._submit_oom_kills([container_kill()])

    own = {
        0: {
            'process_name:java',
            'trigger_process_name:java',
            'trigger_type:cgroup',
            'container_runtime:containerd',
            'kube_qos:burstable',
            'killer:kernel',  # all memory kills in one query, by killer
            'killer_type:kernel',
        },
        1: {f'pod_uid:{POD_UID}'},
        2: {f'container_id:{CONTAINER}', f'cgroup_name:cri-containerd-{CONTAINER}.scope'},
    }
    expected_metric = {'env_name:prod'}
    for lvl in range(level + 1):
        expected_metric |= own[lvl] | set(AGENT_TAGS[lvl])
    [metric] = aggregator.metrics('ebpf_probe.oom_kill.count')
    assert set(metric.tags) == expected_metric
    # The event: one per kill, so everything known, and the pod at orchestrator cardinality.
    [event] = aggregator.events
    assert set(event['tags']) == own[0] | own[1] | own[2] | set(AGENT_TAGS[0] + AGENT_TAGS[1]) | {'env_name:prod'}
    assert event['aggregation_key'] == CONTAINER
    assert sorted(calls) == sorted([(f'container_id://{CONTAINER}', level), (f'container_id://{CONTAINER}', 1)])


def test_a_wrong_tag_cardinality_is_a_configuration_error(dd_run_check):
    check = make_check({'check_tag_cardinality': 'medium'})
    with pytest.raises(Exception, match='check_tag_cardinality'):
        dd_run_check(check)


@pytest.mark.oom
def test_one_probe_failing_during_a_run_leaves_the_other_reporting(
    dd_run_check, aggregator, memory_cgroup, monkeypatch
):
    from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsProbe
    from datadog_checks.ebpf_probe.kernel.libbpf import LibbpfError

    check = make_check({'tags': ['a:b']})
    try:
        dd_run_check(check)
        aggregator.reset()

        def refused(self):
            raise LibbpfError('bpf_map_get_next_id', 1)  # EPERM: say, a security module changed its mind

        monkeypatch.setattr(EbpfStatsProbe, 'snapshot', refused)
        victim = memory_cgroup.oom_kill(comm='isolated')
        dd_run_check(check)  # does not raise
        statuses = {sc.tags[0]: sc for sc in aggregator.service_checks(CAN_LOAD)}
        assert statuses['probe:oom_kill'].status == AgentCheck.OK
        assert statuses['probe:ebpf_stats'].status == AgentCheck.CRITICAL
        assert statuses['probe:ebpf_stats'].message == (
            'collecting failed: bpf_map_get_next_id failed: Operation not permitted (errno 1); '
            'the probe is loaded again at the next run'
        )
        [event] = aggregator.events
        assert event['msg_title'] == f'OOM kill: isolated (pid {victim.pid})'
        assert check._ebpf_stats.probe is None  # closed, its programs released: not left loaded and broken
        assert not {'list_programs', 'bpf_owners'} & set(held_by_me().values())

        # And the other way round: the OOM probe failing leaves the stats flowing, loaded again.
        monkeypatch.undo()
        monkeypatch.setattr(type(check._oom_kill.probe), 'get_and_flush', lambda self: 1 / 0)
        aggregator.reset()
        dd_run_check(check)
        statuses = {sc.tags[0]: sc for sc in aggregator.service_checks(CAN_LOAD)}
        assert statuses['probe:oom_kill'].status == AgentCheck.CRITICAL
        assert 'division by zero' in statuses['probe:oom_kill'].message
        assert statuses['probe:ebpf_stats'].status == AgentCheck.OK
        assert aggregator.metrics('ebpf_probe.programs.total')
        assert {'list_programs', 'bpf_owners'} <= set(held_by_me().values())

        # The OOM probe, failing again at once, is loaded again with the back-off of failed loads.
        aggregator.reset()
        dd_run_check(check)
        [oom] = [sc for sc in aggregator.service_checks(CAN_LOAD) if sc.tags[0] == 'probe:oom_kill']
        assert oom.status == AgentCheck.CRITICAL and oom.message.endswith('the probe is loaded again in 15s')
        monkeypatch.undo()
        aggregator.reset()
        dd_run_check(check)  # within the back-off: not loaded yet
        [oom] = [sc for sc in aggregator.service_checks(CAN_LOAD) if sc.tags[0] == 'probe:oom_kill']
        assert oom.status == AgentCheck.CRITICAL and check._oom_kill.probe is None
    finally:
        check.cancel()


@pytest.mark.oom
def test_two_instances_never_report_a_kill_twice(dd_run_check, aggregator, memory_cgroup, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(lifecycle.time, 'monotonic', lambda: clock[0])
    first = make_check({'tags': ['instance:1'], 'collect_ebpf_stats': False})
    second = make_check({'tags': ['instance:2'], 'collect_ebpf_stats': False})
    try:
        dd_run_check(first)
        dd_run_check(second)
        [refused] = [sc for sc in aggregator.service_checks(CAN_LOAD) if 'instance:2' in sc.tags]
        assert refused.status == AgentCheck.CRITICAL
        assert 'another instance of this check in this process already runs the oom_kill probe' in refused.message
        assert '`collect_oom_kill: false`' in refused.message
        aggregator.reset()

        victim = memory_cgroup.oom_kill(comm='once')
        dd_run_check(first)
        dd_run_check(second)
        [event] = aggregator.events
        assert event['msg_title'] == f'OOM kill: once (pid {victim.pid})' and 'instance:1' in event['tags']
        aggregator.assert_metric('ebpf_probe.oom_kill.count', count=1)

        # When the first instance goes (the Agent unscheduled it), the second takes over at its next retry.
        first.cancel()
        clock[0] += 15
        aggregator.reset()
        dd_run_check(second)
        aggregator.assert_service_check(CAN_LOAD, AgentCheck.OK, tags=['probe:oom_kill', 'instance:2'])
    finally:
        first.cancel()
        second.cancel()


@pytest.mark.oom
def test_a_kill_storm_is_bounded_events_and_one_summary_every_kill_counted(
    dd_run_check, aggregator, instance, memory_cgroup
):
    """A crash loop's kills beyond max_oom_kill_events: one summary event, the count exact."""
    check = make_check({**instance, 'collect_ebpf_stats': False, 'max_oom_kill_events': 2})
    try:
        dd_run_check(check)
        aggregator.reset()
        victims = [memory_cgroup.oom_kill(comm=f'storm-{i % 2}') for i in range(6)]
        dd_run_check(check)

        assert memory_cgroup.kernel_oom_kills() == len(victims)  # the kernel's own count, the reference
        counted = sum(m.value for m in aggregator.metrics('ebpf_probe.oom_kill.count'))
        assert counted == len(victims)
        aggregator.assert_metric('ebpf_probe.oom_kill.unaccounted', value=0, count=1, tags=instance['tags'])
        *kills, storm = aggregator.events
        assert [e['msg_title'] for e in kills] == [f'OOM kill: storm-{i % 2} (pid {v.pid})' for i, v in
                                                   enumerate(victims[:2])]  # fmt: skip
        assert storm['msg_title'] == 'OOM kill storm: 4 more processes killed since the last run'
        assert storm['alert_type'] == 'error' and storm['aggregation_key'] == 'oom_kill_storm'
        assert sorted(storm['tags']) == sorted(['oom_kill_storm:true', *instance['tags']])
        assert victims[-1].started - 1 <= storm['timestamp'] <= victims[-1].ended + 1
        text = storm['msg_text']
        assert 'killed 4 more processes (4 kills) since the last run than the 2 described' in text
        where = f'cgroup /{memory_cgroup.name.replace("-", chr(92) + "-")}'
        assert (
            f'| {where} | **storm\\-0** | kernel | 2 |' in text and f'| {where} | **storm\\-1** | kernel | 2 |' in text
        )
    finally:
        check.cancel()


@pytest.mark.oom
def test_a_record_that_cannot_be_decoded_costs_only_itself(dd_run_check, aggregator, instance, memory_cgroup, caplog):
    check = make_check({**instance, 'collect_ebpf_stats': False})
    try:
        dd_run_check(check)
        probe = check._oom_kill.probe
        consume = probe._consume

        def with_a_broken_copy():  # the records drained, and one cut short among them
            consume()
            probe._pending[:0] = [bytes(raw)[:10] for raw in probe._pending[:1]]

        probe._consume = with_a_broken_copy
        aggregator.reset()
        victim = memory_cgroup.oom_kill(comm='decode-victim')
        with caplog.at_level(logging.WARNING):
            dd_run_check(check)
        [event] = aggregator.events
        assert event['msg_title'] == f'OOM kill: decode-victim (pid {victim.pid})'
        aggregator.assert_metric('ebpf_probe.oom_kill.count', value=1, count=1)
        aggregator.assert_metric('ebpf_probe.oom_kill.dropped', value=1, count=1, tags=instance['tags'])
        said = [r.getMessage() for r in caplog.records if 'could not be decoded' in r.getMessage()]
        assert len(said) == 1 and '(10 bytes)' in said[0]
    finally:
        check.cancel()
