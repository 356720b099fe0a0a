# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the check reads of the kernel: versions, capabilities, BTF, kallsyms, tracefs formats."""

import subprocess

import pytest

from datadog_checks.ebpf_probe.kernel import features, kallsyms, requirements
from datadog_checks.ebpf_probe.kernel.btf import Btf
from datadog_checks.ebpf_probe.kernel.kallsyms import KernelSymbols
from datadog_checks.ebpf_probe.oom_kill.record import MEMCG_OOM_FUNCTIONS, PAGE_KB, SYSTEM_OOM_FUNCTIONS

from . import kernels
from .bpf_objects import bpftool_struct


@pytest.mark.unit
@pytest.mark.parametrize(
    'release, version',
    [('6.18.44-fc-v657', (6, 18, 44)), ('5.15.0-91-generic', (5, 15, 0)), ('6.1', (6, 1, 0)), ('junk', (0, 0, 0))],
)
def test_kernel_version_is_parsed_from_the_release(release, version):
    assert requirements.kernel_version(release) == version


@pytest.mark.unit
@pytest.mark.parametrize(
    'caps, version, missing',
    [
        (1 << requirements.CAP_SYS_ADMIN, (4, 19, 0), []),
        ((1 << requirements.CAP_BPF) | (1 << requirements.CAP_PERFMON), (6, 1, 0), []),
        (1 << requirements.CAP_BPF, (6, 1, 0), ['CAP_PERFMON']),
        (0, (6, 1, 0), ['CAP_BPF', 'CAP_PERFMON']),
        ((1 << requirements.CAP_BPF) | (1 << requirements.CAP_PERFMON), (5, 4, 0), ['CAP_SYS_ADMIN']),  # before CAP_BPF
    ],
)
def test_missing_capabilities(caps, version, missing):
    assert requirements.missing_capabilities(caps, version) == missing


@pytest.mark.unit
def test_perf_event_paranoid_3_is_named_only_without_cap_sys_admin(tmp_path):
    paranoid = tmp_path / 'perf_event_paranoid'
    perfmon = (1 << requirements.CAP_BPF) | (1 << requirements.CAP_PERFMON)
    paranoid.write_text('3\n')
    said = requirements.perf_event_restriction(str(paranoid), caps=perfmon)
    assert said.startswith('kernel.perf_event_paranoid is 3') and 'grant CAP_SYS_ADMIN' in said
    assert requirements.perf_event_restriction(str(paranoid), caps=perfmon | 1 << requirements.CAP_SYS_ADMIN) == ''
    paranoid.write_text('2\n')
    assert requirements.perf_event_restriction(str(paranoid), caps=perfmon) == ''
    assert requirements.perf_event_restriction(str(tmp_path / 'missing'), caps=perfmon) == ''


@pytest.mark.unit
def test_tracepoint_fields_come_from_the_format_file():
    fmt = """name: mark_victim
ID: 500
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;
"""
    assert features.tracepoint_fields(fmt) == ['pid', 'comm', 'total_vm', 'oom_score_adj']


@pytest.mark.kernel
@pytest.mark.parametrize(
    'name', ['task_struct', 'mm_struct', 'kernfs_node', 'bpf_map', 'oom_control', 'trace_event_raw_mark_victim']
)
def test_the_btf_reader_agrees_with_bpftool(name):
    expected = bpftool_struct(name)
    with Btf.open() as btf:
        names = btf.struct_members(name)
        members = [(member, offset // 8) for member, _type, offset in btf.members(btf.find(name, 4))]
    assert members == expected
    if '' in [member for member, _offset in expected]:
        assert names is None  # anonymous members: only members() can say where theirs are
    else:
        assert names == [member for member, _offset in expected]


@pytest.mark.kernel
def test_the_btf_reader_finds_functions_as_bpftool_does():
    with Btf.open() as btf:
        assert btf.has_function('oom_kill_process') or btf.has_function('out_of_memory')
        assert not btf.has_function('no_such_function_anywhere')
        assert btf.struct_members('no_such_struct_anywhere') is None
        kfunc = btf.has_function('bpf_map_sum_elem_count')
    kernel = kernels.current()
    if kernel is not None:
        assert kfunc is (kernel.entry_counting == 'iterator')


@pytest.mark.kernel
def test_the_ring_buffer_probe_matches_the_kernel():
    offered = features.has_ring_buffer()
    kernel = kernels.current()
    if kernel is not None:
        assert offered is kernel.ring_buffer
    shown = subprocess.run(['bpftool', 'feature', 'probe', 'kernel'], capture_output=True, text=True).stdout
    assert offered is ('eBPF map_type ringbuf is available' in shown)


@pytest.mark.kernel
def test_kallsyms_ranges_are_the_functions_of_proc_kallsyms(root):
    symbols = KernelSymbols(MEMCG_OOM_FUNCTIONS | SYSTEM_OOM_FUNCTIONS)
    ranges = symbols.ranges()
    assert {'mem_cgroup_out_of_memory', 'out_of_memory'} <= set(ranges)
    addresses = {}
    with open('/proc/kallsyms') as f:
        for line in f:
            address, kind, name = line.split()[:3]
            if name in ranges and kind in 't T' and name not in addresses:
                addresses[name] = int(address, 16)
    for name, (start, end) in ranges.items():
        assert start == addresses[name]
        assert start < end < start + 64 * 1024  # up to the next symbol
        assert symbols.find(start) == name and symbols.find(end - 1) == name and symbols.find(end) != name


@pytest.mark.unit
def test_kallsyms_hidden_by_kptr_restrict_gives_no_ranges(tmp_path):
    table = tmp_path / 'kallsyms'
    table.write_text('0000000000000000 T out_of_memory\n0000000000000000 T mem_cgroup_out_of_memory\n')
    symbols = KernelSymbols(MEMCG_OOM_FUNCTIONS | SYSTEM_OOM_FUNCTIONS, path=str(table))
    assert symbols.ranges() == {}
    assert symbols.find(0x1234) is None
    # The names stay: a function is known to exist (the kill kprobe's check) without CAP_SYSLOG.
    assert kallsyms.has_function('out_of_memory', path=str(table))
    assert not kallsyms.has_function('out_of', path=str(table))
    assert not kallsyms.has_function('__oom_kill_process', path=str(table))


@pytest.mark.unit
def test_a_kernel_too_old_is_refused_naming_what_it_lacks():
    with pytest.raises(requirements.RequirementError) as error:
        requirements.check_kernel_version((4, 19, 0))
    assert 'needs BPF global data (Linux 5.2)' in str(error.value) and 'tested from Linux 5.10' in str(error.value)
    requirements.check_kernel_version((5, 10, 0))


OTHER_USER_OF_LIBBPF = r"""
import ctypes, json, sys
from datadog_checks.ebpf_probe.kernel import libbpf

lib = ctypes.CDLL(libbpf.library_candidates()[0])  # the same libbpf the check loads
PRINT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
theirs = []
fn = PRINT(lambda level, fmt, args: theirs.append(fmt.decode()) or 0)
lib.libbpf_set_print.restype = ctypes.c_void_p
lib.libbpf_set_print(fn)
ours = None
try:
    libbpf.BpfObject('/nonexistent/ours.bpf.o')  # the check's own call: its message is the check's
except libbpf.LibbpfError as e:
    ours = e.log
before = len(theirs)
lib.bpf_object__open.restype = ctypes.c_void_p
lib.bpf_object__open(b'/nonexistent/theirs.bpf.o')  # the other user's call, after the check loaded libbpf
print(json.dumps({'ours': ours, 'theirs_before': before, 'theirs_after': theirs[before:]}))
"""


@pytest.mark.kernel
def test_libbpfs_messages_of_another_user_in_the_process_still_reach_it():
    """The Agent's process may hold other users of the same libbpf: the check keeps only its own messages."""
    import json
    import sys

    result = subprocess.run([sys.executable, '-c', OTHER_USER_OF_LIBBPF], capture_output=True, text=True, check=True)
    seen = json.loads(result.stdout)
    assert any('ours.bpf.o' in line for line in seen['ours'])
    assert seen['theirs_before'] == 0  # the check's message was the check's alone
    assert seen['theirs_after'], seen  # theirs still reach them


MEMLOCK_CHILD = r"""
import json, resource, sys
from datadog_checks.ebpf_probe.kernel import requirements
soft, hard, needed, version = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))  # lowering a hard limit needs no privilege
try:
    requirements.raise_memlock_limit(needed, tuple(version))
except requirements.RequirementError as e:
    print(json.dumps({'error': str(e)}))
else:
    print(json.dumps({'limits': resource.getrlimit(resource.RLIMIT_MEMLOCK)}))
"""


def memlock_child(soft: int, hard: int, needed: int, version: tuple[int, int, int]) -> dict:
    import json
    import sys

    argv = [sys.executable, '-c', MEMLOCK_CHILD, json.dumps([soft, hard, needed, version])]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


@pytest.mark.unit
def test_before_5_11_the_memlock_limit_is_raised_by_what_the_probes_need_not_to_infinity():
    raised = memlock_child(64 << 10, 8 << 20, 1 << 20, (5, 10, 0))
    assert raised['limits'] == [(64 << 10) + (1 << 20) + requirements.MEMLOCK_FOR_OBJECTS, 8 << 20]
    untouched = memlock_child(64 << 10, 8 << 20, 1 << 20, (5, 11, 0))  # the memory cgroup counts it
    assert untouched['limits'] == [64 << 10, 8 << 20]


@pytest.mark.unit
def test_a_memlock_limit_that_cannot_be_raised_says_what_to_do():
    result = memlock_child(64 << 10, 1 << 20, 8 << 20, (5, 10, 0))  # beyond the hard limit
    if 'error' in result:  # without CAP_SYS_RESOURCE
        assert 'cannot be raised' in result['error'] and 'LimitMEMLOCK=infinity' in result['error']
    else:  # with it, the hard limit too: by what was needed, not to infinity
        assert result['limits'][0] == result['limits'][1] == (64 << 10) + (8 << 20) + requirements.MEMLOCK_FOR_OBJECTS


@pytest.mark.kernel
def test_sizes_in_pages_are_turned_into_kb_with_the_kernels_own_page_size():
    """The OOM domain's usage and limit come in pages: the page size is the running kernel's, as it
    states it for this process's memory (/proc/self/smaps), and the table's on a known kernel."""
    with open('/proc/self/smaps') as f:
        stated = {int(line.split()[1]) for line in f if line.startswith('KernelPageSize:')}
    assert stated == {PAGE_KB}
    kernel = kernels.current()
    if kernel is not None:
        assert PAGE_KB == kernel.page_kb
