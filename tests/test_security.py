# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Security: no shell, no writes outside the check's own BPF objects, reads only what it needs."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'datadog_checks' / 'ebpf_probe'
EBPF_PROBE = str(Path(sys.executable).parent / 'ebpf-probe')

# What the check reads outside the Python installation, and why.
ALLOWED_READS = (
    '/proc/self/',  # its own status (capabilities), fdinfo (memlock, ids), mounts (bpffs)
    '/proc/kallsyms',  # kernel functions of the memcg OOM path
    '/proc/vmstat',  # the kernel's own count of OOM kills (unaccounted kills)
    '/proc/cgroups',  # whether the memory controller is on cgroup v2 (memory.events, pressure)
    '/proc/pressure/memory',  # whether the kernel keeps pressure stall information
    '/proc/sys/kernel/',  # libbpf's feature probes read a few sysctls
    '/proc/sys/vm/overcommit_memory',  # Python 3.13 itself, at start-up (its mimalloc allocator)
    '/sys/kernel/btf/',  # BTF, for CO-RE
    '/sys/kernel/security/lockdown',  # lockdown mode
    '/sys/kernel/tracing/',  # tracefs (classic tracepoint, kprobe events), when mounted
    '/sys/kernel/debug/tracing/',
    '/sys/bus/event_source/devices/',  # whether kprobes exist
    '/sys/devices/system/cpu/',  # possible CPUs (per-CPU maps), read by libbpf too
    '/sys/fs/bpf',  # pinned objects, when bpffs is mounted
    '/sys/fs/cgroup/',  # cgroup directories' names and inodes: the cgroups maps are charged to, owners and links are in
    '/host/sys/fs/cgroup/',  # the same where the Agent's container mounts the host's
    '/dev/null',
    '/etc/ld.so.cache',  # loading libbpf.so.1 and libc
    '/etc/localtime',
    '/usr/share/zoneinfo/',
    '/proc/mounts',  # libffi, when ctypes makes the libbpf callbacks
    '/etc/ssl/',  # CA certificates, read by the base package's HTTP stack when it is imported
)


@pytest.mark.unit
def test_the_package_never_runs_a_shell_or_another_program():
    forbidden_modules = {'subprocess', 'pty', 'pexpect'}
    forbidden_calls = {'system', 'popen', 'spawnl', 'spawnv', 'execv', 'execve', 'execl', 'execlp', 'execvp', 'fork'}
    for path in PACKAGE.rglob('*.py'):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split('.')[0] for a in node.names} & forbidden_modules, path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or '').split('.')[0] not in forbidden_modules, path
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'os':
                assert node.attr not in forbidden_calls, f'{path}:{node.lineno} os.{node.attr}'


def trace_cli(*args):
    """Run `ebpf-probe check` under strace; the file system calls it made (one per line)."""
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    result = subprocess.run(
        ['strace', '-f', '-qq', '-e', 'trace=execve,open,openat,creat,mkdir,mkdirat,unlink,unlinkat,rename,renameat,'
         'renameat2,mount,truncate,ftruncate,chmod,fchmodat,symlink,symlinkat,link,linkat',
         EBPF_PROBE, 'check', *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if '(' in line and 'resumed' not in line]


def python_prefixes():
    import site
    import sysconfig

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(PACKAGE.parent.parent)}
    paths |= set(sysconfig.get_paths().values())
    paths |= set(site.getsitepackages()) | {'/usr/lib/python3', '/usr/lib/python3.11', '/usr/local/lib/python3.11'}
    paths |= {str(Path(p).resolve()) for p in list(paths)}
    return tuple(sorted(paths))


@pytest.mark.kernel
def test_the_check_writes_nothing_and_reads_only_what_it_needs(root):
    calls = trace_cli('-t', '2')
    execs = [c for c in calls if re.search(r'\bexecve\(', c)]
    assert len(execs) == 1 and EBPF_PROBE.split('/')[-1] in execs[0]  # the CLI itself, nothing after
    changing = re.compile(r'\b(creat|mkdir\w*|unlink\w*|rename\w*|f?truncate|f?chmod\w*|symlink\w*|link\w*)\(')
    writing = re.compile(r'O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND')
    writes = [c for c in calls if changing.search(c) or (re.search(r'\bopen(at)?\(', c) and writing.search(c))]
    assert [w for w in writes if '= -1' not in w] == []
    # A mount, if any, is tracefs at its place.
    for mount in (c for c in calls if re.search(r'\bmount\(', c)):
        assert '"tracefs", "/sys/kernel/tracing", "tracefs"' in mount
    opened = {m.group(1) for c in calls if '= -1' not in c and (m := re.search(r'open(?:at)?\([^"]*"([^"]+)"', c))}
    allowed = ALLOWED_READS + python_prefixes() + ('/usr/lib/x86_64-linux-gnu/', '/lib/x86_64-linux-gnu/')
    unexpected = sorted(p for p in opened if not p.startswith(allowed) and not p.startswith(('.', 'pyvenv.cfg')))
    assert unexpected == []
