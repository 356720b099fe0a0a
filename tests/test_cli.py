# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""`ebpf-probe check`, run as a user runs it: a separate process, real kernel, real OOM kill."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from . import kernels
from .processes import UNTIL_TOLD, next_run_now, read_until

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

EBPF_PROBE = str(Path(sys.executable).parent / 'ebpf-probe')


def run_cli(*args, config=None, tmp_path=None, timeout=120, prefix=()):
    argv = [*prefix, EBPF_PROBE, 'check', *args]
    if config is not None:
        path = tmp_path / 'conf.yaml'
        path.write_text(config)
        argv += ['-c', str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_the_installed_script_runs_the_cli():
    result = subprocess.run([EBPF_PROBE, '--help'], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert 'like `datadog-agent check`' in result.stdout


@pytest.mark.oom
@pytest.mark.parametrize('variant', ['co-re', pytest.param('bcc', marks=pytest.mark.bcc)])
def test_an_oom_kill_during_the_pause_is_in_the_next_run(tmp_path, memory_cgroup, variant):
    config = 'init_config:\ninstances:\n  - tags: [team:kernel]\n    collect_ebpf_stats: false\n'
    if variant == 'bcc':
        config += '    enable_core: false\n'
    conf = tmp_path / 'conf.yaml'
    conf.write_text(config)
    proc = subprocess.Popen(
        [EBPF_PROBE, 'check', '--json', '-t', '2', '--pause', UNTIL_TOLD, '-l', 'info', '-c', str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait for the first run to be over, then kill a process during the pause.
        first_run = read_until(proc.stderr, 'run 1 of 2 finished')
        assert f'Loaded the oom_kill probe ({variant})' in first_run
        victim = memory_cgroup.oom_kill(comm='cli-victim', oom_score_adj=42)
        next_run_now(proc)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr

    runs = json.loads(stdout)
    assert len(runs) == 2
    first, second = (run['aggregator'] for run in runs)
    assert sorted(m['metric'] for m in first['metrics']) == [
        'ebpf_probe.oom_kill.dropped',
        'ebpf_probe.oom_kill.unaccounted',
    ]
    [unaccounted] = [m for m in second['metrics'] if m['metric'] == 'ebpf_probe.oom_kill.unaccounted']
    assert unaccounted['points'][0][1] == 0
    assert first['events'] == []

    [point] = [
        m for m in second['metrics']
        if m['metric'] == 'ebpf_probe.oom_kill.count' and 'process_name:cli-victim' in m['tags']
    ]  # fmt: skip
    assert point['points'][0][1] == 1
    assert point['type'] == 'count'
    assert set(point['tags']) == {
        'process_name:cli-victim',
        'trigger_process_name:cli-victim',
        'trigger_type:cgroup',
        f'cgroup_name:{memory_cgroup.name}',
        'killer:kernel',
        'killer_type:kernel',
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
    oom_line, stats_line = result.stderr.splitlines()
    assert '(probe:oom_kill) is CRITICAL: missing capabilities CAP_BPF, CAP_PERFMON' in oom_line
    # eBPF stats are optional: an install without CAP_SYS_ADMIN is a WARNING saying what to do.
    assert stats_line.startswith('ebpf-probe: warning: ')
    assert '(probe:ebpf_stats) is WARNING: missing capability CAP_SYS_ADMIN' in stats_line
    assert 'set collect_ebpf_stats: false' in stats_line
    [run] = json.loads(result.stdout)
    statuses = {sc['tags'][0]: sc['status'] for sc in run['aggregator']['service_checks']}
    assert statuses == {'probe:oom_kill': 2, 'probe:ebpf_stats': 1}
    # Without its probe the check still keeps the kernel's count of kills (readable by anyone).
    assert [(m['metric'], m['points'][0][1]) for m in run['aggregator']['metrics']] == [
        ('ebpf_probe.oom_kill.unaccounted', 0)
    ]


def test_json_lists_every_program_and_map_bpftool_lists(tmp_path):
    """What users compare: the check's output against `bpftool prog show` and `bpftool map show`."""
    from .bpf_objects import OWNER_COMM, bpftool, make_test_objects

    objects = make_test_objects()
    try:
        programs, maps = bpftool('prog', 'show'), bpftool('map', 'show')
        conf = tmp_path / 'conf.yaml'
        # Run-time statistics held all along: the run count is exact, comparable with the runs made.
        conf.write_text('instances:\n  - collect_oom_kill: false\n    program_runtime_sampling: 1\n')
        proc = subprocess.Popen(
            [EBPF_PROBE, 'check', '--json', '-t', '2', '--pause', UNTIL_TOLD, '-l', 'info', '-c', str(conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = read_until(proc.stderr, 'run 1 of 2 finished').splitlines()
            [loaded] = [line for line in lines if 'Loaded the ebpf_stats probe' in line]
            kernel = kernels.current()
            if kernel is not None and kernel.entry_counting == 'iterator':
                misses = ['bpf_link_info (kprobe misses)'] if kernel.kprobes and kernel.kprobe_link_missed else []
                hooks = ['BPF_ENABLE_STATS', *misses, 'iter/bpf_prog', 'iter/bpf_map', 'iter/task_file']
                assert f'with {", ".join(hooks)}, bpf_map_sum_elem_count' in loaded
            else:
                assert 'with BPF_ENABLE_STATS, ' in loaded and 'iter/task_file' in loaded
            objects.run_program(500)  # during the pause, between the two runs
            next_run_now(proc)
            stdout, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0
        second = json.loads(stdout)[1]['aggregator']['metrics']
    finally:
        objects.close()

    def series(metric, **tags):
        return [
            m for m in second
            if m['metric'] == f'ebpf_probe.{metric}' and all(f'{k}:{v}' in m['tags'] for k, v in tags.items())
        ]  # fmt: skip

    for program in programs:
        # bpftool shows the kernel's 15-character name; the check the full one.
        found = [
            s for s in series('program.translated_size', program_type=program['type'])
            if any(t.startswith(f'program_name:{program["name"]}') for t in s['tags'])
        ]  # fmt: skip
        assert found, program
        if (
            len(found) == 1
            and series('program.instances', **dict(t.split(':', 1) for t in found[0]['tags']))[0]['points'][0][1] == 1
        ):
            assert found[0]['points'][0][1] == program['bytes_xlated']
    for m in maps:
        [memory] = series('map.memory', map_name=m['name'], map_type=m['type'])
        [max_entries] = series('map.max_entries', map_name=m['name'], map_type=m['type'])
        assert memory['points'][0][1] == m['bytes_memlock']
        assert max_entries['points'][0][1] == m['max_entries']
        assert f'owner:{OWNER_COMM}' in memory['tags']
    for made in objects.maps.values():
        entries = series('map.entries', map_name=made.name)
        assert [e['points'][0][1] for e in entries] == ([made.entries] if made.entries is not None else [])
    [runs] = series('program.run_count', program_name=objects.program_name, owner=OWNER_COMM)
    assert runs['points'][0][1] == 500
    [run_time] = series('program.run_time', program_name=objects.program_name)
    assert run_time['points'][0][1] > 0


@pytest.mark.oom
def test_a_kill_while_the_check_was_stopped_is_counted_when_it_starts_again_and_only_then(tmp_path, memory_cgroup):
    """The Agent keeps a check's persistent cache across restarts; `--cache-file` keeps it here."""
    cache = tmp_path / 'persistent-cache.json'
    config = 'instances:\n  - collect_ebpf_stats: false\n'

    def unaccounted(result):
        assert result.returncode == 0, result.stderr
        return [
            next(m['points'][0][1] for m in run['aggregator']['metrics'] if m['metric'].endswith('.unaccounted'))
            for run in json.loads(result.stdout)
        ]

    assert unaccounted(run_cli('--json', '--cache-file', str(cache), config=config, tmp_path=tmp_path)) == [0]
    memory_cgroup.oom_kill(comm='unseen')  # no check running: no probe sees it
    # Restarted with its options edited meanwhile: the account is the host's, not the config's.
    config = 'instances:\n  - collect_ebpf_stats: false\n    tags: [edited:yes]\n'
    restarted = run_cli('--json', '-t', '2', '-l', 'warning', '--cache-file', str(cache), config=config,
                        tmp_path=tmp_path)  # fmt: skip
    assert unaccounted(restarted) == [1, 0]  # counted on the first run back, never again
    assert 'while the check was not running' in restarted.stderr
    assert all(run['aggregator']['events'] == [] for run in json.loads(restarted.stdout))
    assert unaccounted(run_cli('--json', '--cache-file', str(cache), config=config, tmp_path=tmp_path)) == [0]


def test_outside_the_hosts_pid_namespace_owners_are_looked_for_only_on_change(tmp_path):
    """An Agent pod without hostPID: the kernel's pids are the host's, which the check cannot watch."""
    config = 'instances:\n  - collect_oom_kill: false\n'
    result = run_cli('--json', '-t', '4', '--pause', '300', '-l', 'debug', config=config, tmp_path=tmp_path,
                     prefix=['unshare', '--pid', '--fork', '--mount-proc'])  # fmt: skip
    assert result.returncode == 0, result.stderr
    scans = [line for line in result.stderr.splitlines() if 'Looking for the holders of eBPF objects' in line]
    # The first run's, and later ones only for objects that came or went (other processes' doing):
    # never a holder taken for gone because its host pid is not one of this namespace's.
    assert scans[0].endswith('first run') and not [line for line in scans if 'a holder exited' in line], scans
    said = [line for line in result.stderr.splitlines() if "not in the host's pid namespace" in line]
    assert len(said) == 1, said
    # The check's own programs are still told as its own (its pid here is not its pid on the host).
    last = json.loads(result.stdout)[-1]['aggregator']['metrics']
    own = [m for m in last if m['metric'] == 'ebpf_probe.program.instances' and 'program_name:bpf_owners' in m['tags']]
    assert own and all('ebpf_probe_self:true' in m['tags'] for m in own), own
