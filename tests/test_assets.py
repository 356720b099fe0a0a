# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The dashboard and monitors shipped in assets/: they exist, parse, and name only real metrics."""

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
SERVICE_CHECK = 'ebpf_probe.probe.can_load'

# `sum:ebpf_probe.oom_kill.count{...}`: the metric of a metric query.
METRIC_IN_QUERY = re.compile(r'(?:avg|sum|min|max):(ebpf_probe\.[A-Za-z0-9_.]+)\{')
# Anything that looks like one of ours, to catch a name outside the usual query shape.
OUR_NAME = re.compile(r'\bebpf_probe(?:\.[A-Za-z0-9_]+)+')
TEMPLATE_VARIABLE = re.compile(r'\$([A-Za-z0-9_]+)')


def load_json(relative: str) -> Any:
    return json.loads((REPO / relative).read_text(encoding='utf-8'))


def manifest_assets() -> dict[str, Any]:
    return load_json('manifest.json')['assets']


def metadata_metrics() -> set[str]:
    with open(REPO / 'metadata.csv', newline='', encoding='utf-8') as f:
        return {row['metric_name'] for row in csv.DictReader(f)}


def service_checks() -> set[str]:
    return {entry['check'] for entry in load_json('assets/service_checks.json')}


def referenced_files() -> list[str]:
    assets = manifest_assets()
    integration = assets['integration']
    files = [
        integration['configuration']['spec'],
        integration['metrics']['metadata_path'],
        integration['service_checks']['metadata_path'],
    ]
    for kind in ('dashboards', 'monitors', 'saved_views', 'logs'):
        value = assets.get(kind) or {}
        files += list(value.values()) if isinstance(value, dict) else [value]
    return files


def dashboard_files() -> list[str]:
    return sorted(manifest_assets().get('dashboards', {}).values())


def monitor_files() -> list[str]:
    return sorted(manifest_assets().get('monitors', {}).values())


def walk_widgets(widgets: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every widget, those inside groups included (groups too)."""
    for widget in widgets:
        yield widget
        yield from walk_widgets(widget['definition'].get('widgets', []))


def definitions(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [w['definition'] for w in walk_widgets(dashboard['widgets'])]


def metric_queries(definition: dict[str, Any]) -> list[str]:
    """The metric queries of a widget (formulas-and-functions `queries`, or legacy `q`)."""
    found = []
    requests = definition.get('requests', [])
    for request in requests if isinstance(requests, list) else []:
        if 'q' in request:
            found.append(request['q'])
        for query in request.get('queries', []):
            if query.get('data_source') == 'metrics':
                found.append(query['query'])
    return found


def all_dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    return [q for d in definitions(dashboard) for q in metric_queries(d)]


def event_queries(definition: dict[str, Any]) -> list[str]:
    if definition['type'] == 'event_stream':
        return [definition['query']]
    if definition['type'] == 'list_stream':
        return [
            r['query']['query_string']
            for r in definition['requests']
            if r['query'].get('data_source') == 'event_stream'
        ]
    return []


@pytest.fixture(scope='module')
def dashboard() -> dict[str, Any]:
    files = dashboard_files()
    assert files == ['assets/dashboards/ebpf_probe_overview.json']
    return load_json(files[0])


@pytest.fixture(scope='module')
def monitors() -> dict[str, dict[str, Any]]:
    return {path: load_json(path) for path in monitor_files()}


# --- manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize('relative', referenced_files())
def test_manifest_asset_exists(relative: str) -> None:
    assert (REPO / relative).is_file(), f'{relative} is in manifest.json but does not exist'
    if relative.endswith('.json'):
        load_json(relative)  # valid JSON


def test_manifest_lists_dashboard_and_monitors() -> None:
    assets = manifest_assets()
    assert assets['dashboards'] == {'eBPF Probe Overview': 'assets/dashboards/ebpf_probe_overview.json'}
    assert set(assets['monitors'].values()) == {
        'assets/monitors/oom_kill_detected.json',
        'assets/monitors/map_nearly_full.json',
        'assets/monitors/probe_cannot_load.json',
        'assets/monitors/oom_kill_unaccounted.json',
        'assets/monitors/container_killed.json',
        'assets/monitors/ring_buffer_nearly_full.json',
    }


def test_manifest_names_match_titles(dashboard: dict[str, Any], monitors: dict[str, dict[str, Any]]) -> None:
    assets = manifest_assets()
    assert list(assets['dashboards']) == [dashboard['title']]
    for title, path in assets['monitors'].items():
        assert monitors[path]['title'] == title


def test_every_asset_file_is_in_manifest() -> None:
    on_disk = {
        str(p.relative_to(REPO)) for folder in ('dashboards', 'monitors') for p in (REPO / 'assets' / folder).glob('*')
    }
    assert on_disk == set(dashboard_files()) | set(monitor_files())


# --- dashboard --------------------------------------------------------------------------------


def test_dashboard_format(dashboard: dict[str, Any]) -> None:
    assert {'title', 'description', 'layout_type', 'widgets', 'template_variables'} <= set(dashboard)
    assert dashboard['layout_type'] == 'ordered'
    assert dashboard['reflow_type'] in ('fixed', 'auto')
    # Top level: groups only.
    assert all(w['definition']['type'] == 'group' for w in dashboard['widgets'])
    ids = [w['id'] for w in walk_widgets(dashboard['widgets'])]
    assert len(ids) == len(set(ids)), 'widget ids must be unique'


def test_dashboard_layouts(dashboard: dict[str, Any]) -> None:
    if dashboard['reflow_type'] != 'fixed':
        return
    for group in dashboard['widgets']:
        inner = group['definition']['widgets']
        assert 'layout' in group
        cells: dict[tuple[int, int], int] = {}
        for widget in inner:
            layout = widget.get('layout')
            assert layout, f'widget {widget["id"]} has no layout in a fixed dashboard'
            assert layout['x'] >= 0 and layout['y'] >= 0
            assert layout['x'] + layout['width'] <= 12, f'widget {widget["id"]} is wider than the grid'
            # The group's height fits its widgets (plus its title row).
            assert layout['y'] + layout['height'] < group['layout']['height']
            for x in range(layout['x'], layout['x'] + layout['width']):
                for y in range(layout['y'], layout['y'] + layout['height']):
                    assert (x, y) not in cells, f'widgets {cells[(x, y)]} and {widget["id"]} overlap'
                    cells[(x, y)] = widget['id']


def test_dashboard_template_variables(dashboard: dict[str, Any]) -> None:
    names = {v['name'] for v in dashboard['template_variables']}
    assert {'host', 'kube_namespace', 'kube_container_name'} <= names
    used = set()
    for definition in definitions(dashboard):
        texts = metric_queries(definition) + event_queries(definition) + definition.get('tags', [])
        for text in texts:
            used |= set(TEMPLATE_VARIABLE.findall(text))
    assert used <= names, f'undeclared template variables: {used - names}'
    assert names <= used, f'template variables no widget uses: {names - used}'


# The Agent's own metrics a widget shows beside ours (the container check's).
AGENT_METRICS = ('container.memory.limit',)


def test_dashboard_metrics_in_metadata(dashboard: dict[str, Any]) -> None:
    known = metadata_metrics()
    queries = all_dashboard_queries(dashboard)
    assert queries
    for query in queries:
        metrics = METRIC_IN_QUERY.findall(query)
        if any(f':{metric}{{' in query for metric in AGENT_METRICS):
            continue
        assert metrics, f'no metric of ours in {query!r}'
        for metric in metrics:
            assert metric in known, f'{metric} (in {query!r}) is not in metadata.csv'
        # Every name of ours in the query is a metric (catches a shape the first pattern misses).
        assert set(OUR_NAME.findall(query)) <= known, query


def test_dashboard_count_metrics_as_count_or_rate(dashboard: dict[str, Any]) -> None:
    with open(REPO / 'metadata.csv', newline='', encoding='utf-8') as f:
        counts = {row['metric_name'] for row in csv.DictReader(f) if row['metric_type'] == 'count'}
    for query in all_dashboard_queries(dashboard):
        for metric in METRIC_IN_QUERY.findall(query):
            if metric in counts:
                assert '.as_count()' in query or '.as_rate()' in query, query


def _queries_of(dashboard: dict[str, Any], widget_types: set[str], metric: str) -> list[str]:
    return [
        q
        for d in definitions(dashboard)
        if d['type'] in widget_types
        for q in metric_queries(d)
        if METRIC_IN_QUERY.search(q) and metric in METRIC_IN_QUERY.findall(q)
    ]


def _group_by(query: str) -> set[str]:
    match = re.search(r'\}\s*by\s*\{([^}]*)\}', query)
    return {tag.strip() for tag in match.group(1).split(',')} if match else set()


@pytest.mark.parametrize('tag', ['kube_container_name', 'cgroup_name', 'process_name', 'trigger_type'])
def test_dashboard_oom_kills_split_by(dashboard: dict[str, Any], tag: str) -> None:
    queries = _queries_of(dashboard, {'timeseries', 'toplist'}, 'ebpf_probe.oom_kill.count')
    split = [q for q in queries if tag in _group_by(q)]
    assert split, f'no timeseries or top list of OOM kills by {tag}'
    assert all(q.startswith('sum:') and q.endswith('.as_count()') for q in split)


def test_dashboard_oom_kills_by_kubernetes_container(dashboard: dict[str, Any]) -> None:
    queries = _queries_of(dashboard, {'timeseries', 'toplist'}, 'ebpf_probe.oom_kill.count')
    # Tags the count has at the Agent's default (low) cardinality: no pod name, no container id.
    assert any({'kube_namespace', 'kube_container_name'} <= _group_by(q) for q in queries)
    assert not any({'pod_name', 'container_id'} & _group_by(q) for q in queries)


def test_dashboard_unaccounted_and_group_kills(dashboard: dict[str, Any]) -> None:
    assert _queries_of(dashboard, {'timeseries', 'query_value'}, 'ebpf_probe.oom_kill.unaccounted')
    queries = _queries_of(dashboard, {'timeseries', 'toplist'}, 'ebpf_probe.oom_kill.count')
    assert any('oom_group:true' in q for q in queries)
    assert any('container_main_process' in _group_by(q) for q in queries)


def test_dashboard_dropped_kills(dashboard: dict[str, Any]) -> None:
    assert _queries_of(dashboard, {'timeseries', 'query_value'}, 'ebpf_probe.oom_kill.dropped')


@pytest.mark.parametrize(
    'metric, group_by',
    [
        ('ebpf_probe.program.cpu_usage', 'program_name'),
        ('ebpf_probe.program.average_run_time', 'program_name'),
        ('ebpf_probe.map.occupancy', 'map_name'),
        ('ebpf_probe.map.memory', 'map_name'),
        ('ebpf_probe.programs.total', 'owner'),
        ('ebpf_probe.maps.total', 'owner'),
    ],
)
def test_dashboard_top_lists(dashboard: dict[str, Any], metric: str, group_by: str) -> None:
    queries = _queries_of(dashboard, {'toplist'}, metric)
    assert any(group_by in _group_by(q) for q in queries), f'no top list of {metric} by {group_by}'


def test_dashboard_map_occupancy_is_max(dashboard: dict[str, Any]) -> None:
    queries = _queries_of(dashboard, {'toplist'}, 'ebpf_probe.map.occupancy')
    assert queries and all(q.startswith('max:') for q in queries)


def test_dashboard_program_run_time_rate(dashboard: dict[str, Any]) -> None:
    queries = _queries_of(dashboard, {'timeseries', 'toplist'}, 'ebpf_probe.program.run_time')
    assert any(q.endswith('.as_rate()') and 'program_name' in _group_by(q) for q in queries)


@pytest.mark.parametrize(
    'metric, group_by',
    [
        ('ebpf_probe.programs.total', 'program_type'),
        ('ebpf_probe.maps.total', 'map_type'),
    ],
)
def test_dashboard_totals_by_type(dashboard: dict[str, Any], metric: str, group_by: str) -> None:
    queries = _queries_of(dashboard, {'timeseries', 'toplist'}, metric)
    assert any(group_by in _group_by(q) for q in queries)


def test_dashboard_memory_totals(dashboard: dict[str, Any]) -> None:
    for metric in ('ebpf_probe.programs.memory', 'ebpf_probe.maps.memory'):
        assert _queries_of(dashboard, {'timeseries', 'toplist'}, metric), metric


def test_dashboard_probe_status(dashboard: dict[str, Any]) -> None:
    checks = [d for d in definitions(dashboard) if d['type'] == 'check_status']
    assert checks
    assert all(d['check'] in service_checks() for d in checks)
    assert any(d['check'] == SERVICE_CHECK and d.get('group_by') == ['probe'] for d in checks)
    assert all(d['grouping'] in ('check', 'cluster') for d in checks)


def test_dashboard_event_stream(dashboard: dict[str, Any]) -> None:
    streams = [q for d in definitions(dashboard) for q in event_queries(d)]
    assert any(re.search(r'\bsources?:ebpf_probe\b', q) for q in streams), streams


def test_dashboard_names_only_known_things(dashboard: dict[str, Any]) -> None:
    """Any `ebpf_probe.x` string anywhere in a query or check is a metric or our service check."""
    known = metadata_metrics() | service_checks()
    for definition in definitions(dashboard):
        texts = metric_queries(definition) + event_queries(definition)
        if definition['type'] == 'check_status':
            texts.append(definition['check'])
        for text in texts:
            assert set(OUR_NAME.findall(text)) <= known, text


# --- monitors ---------------------------------------------------------------------------------


def test_monitors_format(monitors: dict[str, dict[str, Any]]) -> None:
    assert monitors
    for path, monitor in monitors.items():
        assert monitor['version'] == 2, path
        for key in ('created_at', 'last_updated_at', 'title', 'description', 'definition', 'tags'):
            assert monitor.get(key), f'{path}: no {key}'
        assert re.fullmatch(r'\d{4}-\d{2}-\d{2}', monitor['created_at']), path
        definition = monitor['definition']
        for key in ('name', 'type', 'query', 'message', 'options'):
            assert definition.get(key), f'{path}: definition has no {key}'
        assert definition['type'] in ('query alert', 'service check', 'event-v2 alert'), path
        assert 'integration:ebpf_probe' in definition.get('tags', []), path
        assert definition['options'].get('thresholds'), path


def test_monitor_metrics_in_metadata(monitors: dict[str, dict[str, Any]]) -> None:
    known = metadata_metrics()
    for path, monitor in monitors.items():
        definition = monitor['definition']
        if definition['type'] != 'query alert':
            continue
        metrics = METRIC_IN_QUERY.findall(definition['query'])
        assert metrics, path
        assert set(metrics) <= known, path
        assert set(OUR_NAME.findall(definition['query'])) <= known, path


def test_monitor_query_thresholds_agree(monitors: dict[str, dict[str, Any]]) -> None:
    for path, monitor in monitors.items():
        definition = monitor['definition']
        if definition['type'] != 'query alert':
            continue
        critical = float(re.search(r'[<>]=?\s*(-?[0-9.]+)\s*$', definition['query']).group(1))
        assert definition['options']['thresholds']['critical'] == critical, path


def test_service_check_monitor(monitors: dict[str, dict[str, Any]]) -> None:
    checks = service_checks()
    found = [m['definition'] for m in monitors.values() if m['definition']['type'] == 'service check']
    assert found
    for definition in found:
        name = re.match(r'"([^"]+)"\.over\(', definition['query']).group(1)
        assert name == SERVICE_CHECK
        assert name in checks
        assert '.count_by_status()' in definition['query']
        thresholds = definition['options']['thresholds']
        last = int(re.search(r'\.last\((\d+)\)', definition['query']).group(1))
        assert 1 <= thresholds['critical'] <= last
        assert 1 <= thresholds['ok'] <= last


def test_oom_kill_monitor(monitors: dict[str, dict[str, Any]]) -> None:
    definition = monitors['assets/monitors/oom_kill_detected.json']['definition']
    assert definition['type'] == 'query alert'
    query = definition['query']
    assert query.startswith('sum(last_5m):sum:ebpf_probe.oom_kill.count{')
    # Tags the count has at the Agent's default (low) cardinality.
    assert _group_by(query) == {'kube_namespace', 'kube_container_name', 'host', 'killer'}
    assert query.endswith('.as_count() > 0')
    assert definition['options']['require_full_window'] is False  # a sparse count


def test_container_killed_monitor(monitors: dict[str, dict[str, Any]]) -> None:
    definition = monitors['assets/monitors/container_killed.json']['definition']
    query = definition['query']
    # The kernel's own kills have their monitor; this one is for the SIGKILLs sent from user space.
    assert query.startswith('sum(last_5m):sum:ebpf_probe.container_kill.count{!killer_type:kernel}')
    assert _group_by(query) == {'kube_namespace', 'kube_container_name', 'host', 'killer', 'killer_type'}
    assert query.endswith('.as_count() > 0')
    assert definition['options']['require_full_window'] is False


def test_unaccounted_kills_monitor(monitors: dict[str, dict[str, Any]]) -> None:
    definition = monitors['assets/monitors/oom_kill_unaccounted.json']['definition']
    query = definition['query']
    assert query.startswith('sum(last_1h):sum:ebpf_probe.oom_kill.unaccounted{')
    assert _group_by(query) == {'host'} and query.endswith('.as_count() > 0')


def test_map_nearly_full_monitor(monitors: dict[str, dict[str, Any]]) -> None:
    definition = monitors['assets/monitors/map_nearly_full.json']['definition']
    query = definition['query']
    assert query.startswith('max(last_10m):max:ebpf_probe.map.occupancy{')
    assert _group_by(query) == {'map_name', 'host'}
    assert definition['options']['thresholds'] == {'critical': 0.9, 'warning': 0.8}
    assert 'max_entries' in definition['message']


def test_probe_monitor_says_what_to_do(monitors: dict[str, dict[str, Any]]) -> None:
    message = monitors['assets/monitors/probe_cannot_load.json']['definition']['message']
    for hint in ('CAP_BPF', 'CAP_SYS_ADMIN', 'btf_path', 'README'):
        assert hint in message


def test_events_carry_the_manifests_source_type_name() -> None:
    from datadog_checks.ebpf_probe.check import SOURCE_TYPE_NAME

    assert manifest_assets()['integration']['source_type_name'] == SOURCE_TYPE_NAME
