# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Runs inside every VM row (started by tests/vm/init): what the kernel offers, then pytest.

Writes /results (facts.json, junit.xml, pytest.log, dmesg.txt, summary.json) and prints it on the
console as a base64 tar between markers, with its sha256; tests/vm/run.py reads it back. Standard
library only: it must not depend on the package under test.
"""

import base64
import hashlib
import io
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path('/opt/ebpf-probe')
RESULTS = Path('/results')
BEGIN = '=== ebpf-probe results begin'
END = '=== ebpf-probe results end ==='
CONFIG_OPTIONS = (
    'KPROBES',
    'KPROBE_EVENTS',
    'FPROBE',
    'BPF_KPROBE_OVERRIDE',
    'FUNCTION_TRACER',
    'DYNAMIC_FTRACE_WITH_DIRECT_CALLS',
    'BPF_JIT',
    'BPF_EVENTS',
    'BPF_LSM',
    'DEBUG_INFO_BTF',
    'DEBUG_INFO_BTF_MODULES',
    'KALLSYMS_ALL',
    'IKHEADERS',
    'MEMCG',
    'CGROUP_BPF',
    'BPF_UNPRIV_DEFAULT_OFF',
    'SECURITY_LOCKDOWN_LSM',
    'MODULES',
)
BTF_FUNCTIONS = (
    'bpf_map_sum_elem_count',
    'bpf_iter_bpf_map',
    'bpf_iter_task_file',
    'oom_kill_process',
    'mem_cgroup_out_of_memory',
    'bpf_get_current_task_btf',
    'bpf_for_each_map_elem',
)
BTF_STRUCTS = ('trace_event_raw_mark_victim', 'oom_control')
KALLSYMS = (
    'oom_kill_process',
    '__oom_kill_process',
    'mem_cgroup_out_of_memory',
    'out_of_memory',
    'bpf_map_sum_elem_count',
    'bpf_map_fops',
)


def say(message):
    print(f'guest: {message}', flush=True)


def read(path, default=None):
    try:
        return Path(path).read_text()
    except OSError:
        return default


def btf_names(path='/sys/kernel/btf/vmlinux'):
    """Functions and struct members of the kernel's BTF (a minimal reader of the format)."""
    data = Path(path).read_bytes()
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from('<HBBIIIII', data)
    if magic != 0xEB9F:
        raise ValueError('not little-endian BTF')
    types, strings = hdr_len + type_off, hdr_len + str_off

    def name(offset):
        return data[strings + offset : data.index(b'\0', strings + offset)].decode()

    functions, structs = set(), {}
    extra = {1: 4, 3: 12, 4: 12, 5: 12, 6: 8, 13: 8, 14: 4, 15: 12, 17: 4, 19: 12}  # per-kind bytes (x vlen)
    per_member = {4: True, 5: True, 6: True, 13: True, 15: True, 19: True}
    offset = types
    while offset < types + type_len:
        name_off, info, _size = struct.unpack_from('<III', data, offset)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        offset += 12
        if kind == 12:  # FUNC
            functions.add(name(name_off))
        if kind == 4 and name_off and name(name_off) in BTF_STRUCTS:  # STRUCT
            structs[name(name_off)] = [name(struct.unpack_from('<I', data, offset + 12 * i)[0]) for i in range(vlen)]
        offset += extra.get(kind, 0) * (vlen if per_member.get(kind) else 1)
    return {'functions': {f: f in functions for f in BTF_FUNCTIONS}, 'structs': structs}


def tracepoint_fields(category, event):
    fmt = read(f'/sys/kernel/tracing/events/{category}/{event}/format')
    if fmt is None:
        return None
    fields = re.findall(r'field:[^;]*?([A-Za-z_][A-Za-z0-9_]*)(?:\[[^\]]*\])?;', fmt)
    return [f for f in fields if not f.startswith('common_')]


def bpftool_features():
    started = time.monotonic()
    result = subprocess.run(['bpftool', '-j', 'feature', 'probe', 'kernel'], capture_output=True, text=True)
    if result.returncode:
        return {'error': result.stderr.strip()[-500:]}
    probe = json.loads(result.stdout)
    prog_types = probe.get('program_types', {})
    map_types = probe.get('map_types', {})
    helpers = probe.get('helpers', {})
    kprobe_helpers = set(helpers.get('kprobe_available_helpers', []))
    return {
        'seconds': round(time.monotonic() - started, 1),
        'program_types': sorted(k.removeprefix('have_').removesuffix('_prog_type') for k, v in prog_types.items() if v),
        'map_types': sorted(k.removeprefix('have_').removesuffix('_map_type') for k, v in map_types.items() if v),
        'ringbuf_map': bool(map_types.get('have_ringbuf_map_type')),
        'kprobe_helpers': {
            h: h in kprobe_helpers
            for h in ('bpf_get_current_task_btf', 'bpf_for_each_map_elem', 'bpf_ringbuf_output', 'bpf_get_func_ip')
        },
        'system_config': probe.get('system_config', {}),
        'syscall_config': probe.get('syscall_config', {}),
    }


def cgroup_facts():
    root = Path('/sys/fs/cgroup')
    facts = {'controllers': read(root / 'cgroup.controllers', '').split(), 'mounted': read('/proc/self/cgroup')}
    probe = root / 'ebpf-probe-facts'
    try:
        probe.mkdir()
        facts['memory_oom_group'] = (probe / 'memory.oom.group').exists()
        facts['memory_events_local'] = (probe / 'memory.events.local').exists()
    finally:
        probe.rmdir()
    return facts


def kernel_config():
    text = read(HERE / 'kernel-config', '')
    values = dict(re.findall(r'^CONFIG_(\w+)=(.*)$', text, re.M))
    return {option: values.get(option, 'n') for option in CONFIG_OPTIONS}


def installed_wheel(expected):
    """The wheel built on the host, as installed here: every file of its RECORD, byte for byte."""
    site = Path(expected['site_packages'])
    [dist_info] = site.glob(expected['dist_info'])
    mismatches = []
    for line in (dist_info / 'RECORD').read_text().splitlines():
        path, digest, _size = line.rsplit(',', 2)
        if not digest:
            continue
        algorithm, value = digest.split('=', 1)
        actual = base64.urlsafe_b64encode(hashlib.new(algorithm, (site / path).read_bytes()).digest()).rstrip(b'=')
        if actual.decode() != value:
            mismatches.append(path)
    return {'dist_info': dist_info.name, 'record_mismatches': mismatches, 'wheel_sha256': expected['sha256']}


def facts(run):
    uname = os.uname()
    available = read('/sys/kernel/tracing/available_filter_functions', '')
    kallsyms = {}
    for line in read('/proc/kallsyms', '').splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in KALLSYMS:
            kallsyms[parts[2]] = parts[1]
    result = {
        'row': run['row'],
        'release': uname.release,
        'version': uname.version,
        'machine': uname.machine,
        'python': platform.python_version(),
        'cmdline': read('/proc/cmdline', '').strip(),
        'btf': os.path.exists('/sys/kernel/btf/vmlinux'),
        'kprobe_pmu': os.path.isdir('/sys/bus/event_source/devices/kprobe'),
        'uprobe_pmu': os.path.isdir('/sys/bus/event_source/devices/uprobe'),
        'config': kernel_config(),
        'mark_victim_fields': tracepoint_fields('oom', 'mark_victim'),
        'oom_tracepoints': sorted(os.listdir('/sys/kernel/tracing/events/oom'))
        if os.path.isdir('/sys/kernel/tracing/events/oom')
        else None,
        'filter_functions': {
            f: bool(re.search(rf'^{f}\b', available, re.M))
            for f in ('oom_kill_process', '__oom_kill_process', 'mem_cgroup_out_of_memory')
        },
        'kallsyms': {name: kallsyms.get(name) for name in KALLSYMS},
        'sysctl': {
            name: (read(f'/proc/sys/kernel/{name}') or '').strip()
            for name in ('unprivileged_bpf_disabled', 'bpf_stats_enabled', 'perf_event_paranoid', 'kptr_restrict')
        },
        'lockdown': (read('/sys/kernel/security/lockdown') or '').strip() or None,
        'cgroup': cgroup_facts(),
        'wheel': installed_wheel(run['wheel']),
        'layers': run['layers'],
    }
    try:
        result['btf_names'] = btf_names() if result['btf'] else None
    except Exception as error:  # a fact we could not read is a fact
        result['btf_names'] = {'error': repr(error)}
    result['bpftool'] = bpftool_features()
    result['bcc'] = os.path.isdir('/usr/lib/python3/dist-packages/bcc')
    result['kernel_headers'] = os.path.isdir(f'/lib/modules/{uname.release}/build')
    podman = subprocess.run(['podman', '--version'], capture_output=True, text=True) if shutil.which('podman') else None
    result['podman'] = podman.stdout.strip() if podman else None
    versions = subprocess.run(['bpftool', 'version', '-j'], capture_output=True, text=True).stdout
    result['bpftool_version'] = json.loads(versions) if versions.strip() else None
    return result


def run_pytest(run):
    args = [
        sys.executable,
        '-m',
        'pytest',
        '-o',
        'addopts=',
        '-p',
        'no:cacheprovider',
        '-vv',  # whole assertion diffs: the failure text is all the host gets
        '-rA',
        '--color=no',
        f'--junitxml={RESULTS / "junit.xml"}',
        '-o',
        'junit_family=xunit1',  # names each test's file: the host rebuilds pytest's node ids
        '--ignore=tests/vm/test_kernels.py',
        *run['pytest_args'],
    ]
    say('$ ' + ' '.join(args[1:]))
    env = {**os.environ, 'EBPF_PROBE_VM_ROW': run['row']}
    with open(RESULTS / 'pytest.log', 'w') as log:
        proc = subprocess.Popen(
            args,
            cwd=HERE / 'checkout',
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors='replace',
            env=env,
        )
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)  # the console log keeps the whole run
        return proc.wait()


def main():
    started = time.monotonic()
    run = json.loads((HERE / 'run.json').read_text())
    RESULTS.mkdir(exist_ok=True)
    summary = {'uptime_at_start': float(read('/proc/uptime', '0').split()[0])}
    say(f'row {run["row"]}: kernel {os.uname().release} ({os.uname().machine}), up {summary["uptime_at_start"]} s')
    try:
        (RESULTS / 'facts.json').write_text(json.dumps(facts(run), indent=1))
    except Exception as error:
        (RESULTS / 'facts.json').write_text(json.dumps({'error': repr(error)}))
    summary['facts_seconds'] = round(time.monotonic() - started, 1)
    say(f'facts in {summary["facts_seconds"]} s')
    pytest_started = time.monotonic()
    try:
        summary['pytest_exit'] = run_pytest(run)
    except Exception as error:
        summary['pytest_exit'], summary['pytest_error'] = None, repr(error)
    summary['pytest_seconds'] = round(time.monotonic() - pytest_started, 1)
    dmesg = subprocess.run(['dmesg'], capture_output=True, text=True, errors='replace').stdout
    (RESULTS / 'dmesg.txt').write_text(dmesg)
    (RESULTS / 'summary.json').write_text(json.dumps(summary))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        tar.add(RESULTS, arcname='.')
    payload = buffer.getvalue()
    encoded = base64.b64encode(payload).decode()
    say(f'pytest exit {summary["pytest_exit"]} in {summary["pytest_seconds"]} s; sending {len(payload)} bytes')
    lines = [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
    sys.stdout.write(f'{BEGIN} sha256={hashlib.sha256(payload).hexdigest()} ===\n' + '\n'.join(lines) + f'\n{END}\n')
    sys.stdout.flush()


if __name__ == '__main__':
    main()
