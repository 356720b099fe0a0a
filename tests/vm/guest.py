# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Runs inside the VM (Debian 12's kernel): the OOM-kill and accounting checks, on the real thing.

Prints one JSON document between markers on the console; the host side (test_second_kernel.py)
makes the assertions, so that a failure shows the whole picture.
"""

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback

RESULT_BEGIN = '=== ebpf-probe guest results begin ==='
RESULT_END = '=== ebpf-probe guest results end ==='
log = logging.getLogger('guest')


def step(results, name, function):
    started = time.monotonic()
    try:
        results[name] = function()
    except BaseException:  # report everything to the host
        results[name] = {'error': traceback.format_exc()}
    results.setdefault('seconds', {})[name] = round(time.monotonic() - started, 1)
    print(f'guest: {name} done in {results["seconds"][name]} s', flush=True)


def cli_with_an_oom_kill_between_runs():
    """`ebpf-probe check --json -t 2`, a real OOM kill in a memory cgroup during the pause."""
    from cgroups import MemoryCgroup
    from processes import read_until

    with open('/tmp/conf.yaml', 'w') as f:
        f.write('instances:\n  - tags: [kernel:second]\n')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'datadog_checks.ebpf_probe.cli', 'check', '--json', '-t', '2', '--pause', '15000',
         '-l', 'info', '-c', '/tmp/conf.yaml'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first_run = read_until(proc.stderr, 'run 1 of 2 finished')
    cgroup = MemoryCgroup(limit_mb=32)
    try:
        victim = cgroup.oom_kill(comm='vm-victim', oom_score_adj=42)
    finally:
        cgroup.remove()
    stdout, rest = proc.communicate(timeout=300)
    return {
        'returncode': proc.returncode,
        'runs': json.loads(stdout) if stdout.strip() else None,
        'stderr': first_run + rest,
        'victim_pid': victim.pid,
        'cgroup_path': cgroup.path,
        'limit_pages': 32 * 1024 * 1024 // os.sysconf('SC_PAGE_SIZE'),
    }


def probe_records_with_oom_control():
    """The factory and get_and_flush() directly: every field of the record."""
    from cgroups import MemoryCgroup

    from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe

    probe = load_oom_kill_probe(OOMKillProbeOptions(allow_runtime_compiled_fallback=False), log)
    try:
        probe.get_and_flush()
        cgroup = MemoryCgroup(limit_mb=32)
        try:
            victim = cgroup.oom_kill(comm='vm-probe', oom_score_adj=7)
        finally:
            cgroup.remove()
        result = probe.get_and_flush()
        return {
            'variant': probe.variant,
            'hooks': probe.hooks,
            'rejected_hooks': probe.rejected_hooks,
            'kills': [dataclasses.asdict(k) for k in result.kills],
            'dropped': result.dropped,
            'victim_pid': victim.pid,
            'cgroup_path': cgroup.path,
        }
    finally:
        probe.close()


def accounting_without_the_kfunc():
    """eBPF accounting where bpf_map_sum_elem_count does not exist (6.1 < 6.6): the fallbacks, for real."""
    from bpf_objects import make_test_objects

    from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe

    objects = make_test_objects()
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        objects.run_program(300)
        snapshot = probe.get_and_flush()
        maps = {m.id: m for m in snapshot.maps}
        programs = {p.id: p for p in snapshot.programs}
        shown_maps = json.loads(subprocess.run(['bpftool', '-j', 'map', 'show'], capture_output=True).stdout or '[]')
        return {
            'hooks': probe.hooks,
            'rejected_hooks': probe.rejected_hooks,
            'limitations': probe.limitations,
            'maps': {
                kind: {
                    'expected_entries': made.entries,
                    'entries': maps[made.id].entries,
                    'method': maps[made.id].entries_method,
                    'memory': maps[made.id].memory_bytes,
                    'bpftool_memlock': next((m['bytes_memlock'] for m in shown_maps if m['id'] == made.id), None),
                    'owners': [dataclasses.asdict(o) for o in maps[made.id].owners],
                }
                for kind, made in objects.maps.items()
            },
            'program_run_count': programs[objects.program_id].run_count,
            'fixture_pid': objects.pid,
        }
    finally:
        probe.close()
        objects.close()


def main():
    logging.basicConfig(level=logging.WARNING)
    import datadog_checks.ebpf_probe as package
    from datadog_checks.ebpf_probe.resources import bpf_file

    results = {
        'kernel': os.uname().release,
        'package': package.__file__,
        'core_object_sha256': hashlib.sha256(bpf_file('oom_kill.bpf.o').read_bytes()).hexdigest(),
    }
    step(results, 'cli', cli_with_an_oom_kill_between_runs)
    step(results, 'probe', probe_records_with_oom_control)
    step(results, 'accounting', accounting_without_the_kfunc)
    print(RESULT_BEGIN)
    print(json.dumps(results))
    print(RESULT_END, flush=True)


if __name__ == '__main__':
    main()
