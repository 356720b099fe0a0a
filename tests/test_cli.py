# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""`ebpf-probe check`, run as a user runs it: a separate process, real kernel, real OOM kill."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

EBPF_PROBE = str(Path(sys.executable).parent / 'ebpf-probe')


def run_cli(*args, config=None, tmp_path=None, timeout=120, prefix=()):
    argv = [*prefix, EBPF_PROBE, 'check', *args]
    if config is not None:
        path = tmp_path / 'conf.yaml'
        path.write_text(config)
        argv += ['-c', str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_the_script_is_installed():
    assert os.access(EBPF_PROBE, os.X_OK)


@pytest.mark.oom
@pytest.mark.parametrize('variant', ['co-re', 'bcc'])
def test_an_oom_kill_during_the_pause_is_in_the_next_run(tmp_path, memory_cgroup, variant):
    config = 'init_config:\ninstances:\n  - tags: [team:kernel]\n'
    if variant == 'bcc':
        config += '    enable_core: false\n'
    conf = tmp_path / 'conf.yaml'
    conf.write_text(config)
    proc = subprocess.Popen(
        [EBPF_PROBE, 'check', '--json', '-t', '2', '--pause', '3000', '-l', 'info', '-c', str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait for the first run to have loaded the probe, then kill a process during the pause.
        stderr_lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            stderr_lines.append(line)
            if 'Loaded the oom_kill probe' in line or not line:
                break
        assert f'Loaded the oom_kill probe ({variant})' in ''.join(stderr_lines)
        victim = memory_cgroup.oom_kill(comm='cli-victim', oom_score_adj=42)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr

    runs = json.loads(stdout)
    assert len(runs) == 2
    first, second = (run['aggregator'] for run in runs)
    assert [m['metric'] for m in first['metrics']] == ['ebpf_probe.oom_kill.dropped']
    assert first['events'] == []

    [point] = [m for m in second['metrics'] if m['metric'] == 'ebpf_probe.oom_kill.count']
    assert point['points'][0][1] == 1
    assert point['type'] == 'count'
    assert set(point['tags']) == {
        'process_name:cli-victim',
        'trigger_process_name:cli-victim',
        'trigger_type:cgroup',
        f'cgroup_name:{memory_cgroup.name}',
        'team:kernel',
    }
    [event] = second['events']
    assert event['msg_title'] == f'OOM kill: cli-victim (pid {victim.pid})'
    assert event['alert_type'] == 'error'
    assert 'oom_score_adj 42' in event['msg_text']
    assert [sc['status'] for sc in second['service_checks']] == [0]


def test_human_output_has_the_agents_sections(tmp_path):
    result = run_cli()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    series, events, service_checks = (
        out.index(s) for s in ('=== Series ===', '=== Events ===', '=== Service Checks ===')
    )
    assert series < events < service_checks
    assert (
        json.loads(out[service_checks + len('=== Service Checks ===') : out.index('=========\nCollector')])[0]['check']
        == 'ebpf_probe.probe.can_load'
    )
    assert 'Total Runs: 1' in out
    assert result.stderr == ''


@pytest.mark.parametrize(
    'config, message',
    [
        (None, 'cannot read config file /nonexistent/conf.yaml: No such file or directory'),
        ('instances: [', 'is not valid YAML'),
        ('init_config:\ninstances: {}\n', '`instances` must be a non-empty list'),
        ('- just\n- a list\n', 'must be a mapping with `init_config` and `instances`'),
    ],
    ids=['missing', 'yaml', 'instances', 'not-a-mapping'],
)
def test_a_bad_config_file_is_one_line_on_stderr(tmp_path, config, message):
    if config is None:
        result = subprocess.run([EBPF_PROBE, 'check', '-c', '/nonexistent/conf.yaml'], capture_output=True, text=True)
    else:
        result = run_cli(config=config, tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ''
    assert result.stderr.count('\n') == 1
    assert result.stderr.startswith('ebpf-probe: error: ') and message in result.stderr


def test_a_wrong_option_fails_the_run_with_its_name(tmp_path):
    result = run_cli(config='instances:\n  - enable_core: maybe\n', tmp_path=tmp_path)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith('ebpf-probe: error: ') and 'enable_core' in line


def test_without_privileges_it_says_which_capabilities_are_missing(tmp_path):
    # Root with every capability dropped: it can still read its venv wherever it lives.
    no_capabilities = ['setpriv', '--inh-caps=-all', '--bounding-set=-all']
    result = run_cli('--json', prefix=no_capabilities)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert 'missing capabilities CAP_BPF, CAP_PERFMON' in line
    [run] = json.loads(result.stdout)
    [sc] = run['aggregator']['service_checks']
    assert sc['status'] == 2 and 'CAP_SYS_ADMIN' in sc['message']
