# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the check reads of the kernel: versions, capabilities, BTF, kallsyms, tracefs formats."""

import pytest

from datadog_checks.ebpf_probe import kernel, libbpf
from datadog_checks.ebpf_probe.oom_kill import (
    MEMCG_OOM_FUNCTIONS,
    SYSTEM_OOM_FUNCTIONS,
    mark_victim_passes_task,
    task_hook_available,
)


@pytest.mark.unit
@pytest.mark.parametrize(
    'release, version',
    [('6.18.44-fc-v657', (6, 18, 44)), ('5.15.0-91-generic', (5, 15, 0)), ('6.1', (6, 1, 0)), ('junk', (0, 0, 0))],
)
def test_kernel_version_is_parsed_from_the_release(release, version):
    assert kernel.kernel_version(release) == version


@pytest.mark.unit
@pytest.mark.parametrize(
    'caps, version, missing',
    [
        (1 << kernel.CAP_SYS_ADMIN, (4, 19, 0), []),
        ((1 << kernel.CAP_BPF) | (1 << kernel.CAP_PERFMON), (6, 1, 0), []),
        (1 << kernel.CAP_BPF, (6, 1, 0), ['CAP_PERFMON']),
        (0, (6, 1, 0), ['CAP_BPF', 'CAP_PERFMON']),
        ((1 << kernel.CAP_BPF) | (1 << kernel.CAP_PERFMON), (5, 4, 0), ['CAP_SYS_ADMIN']),  # before CAP_BPF
    ],
)
def test_missing_capabilities(caps, version, missing):
    assert kernel.missing_capabilities(caps, version) == missing


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
    assert kernel.tracepoint_fields(fmt) == ['pid', 'comm', 'total_vm', 'oom_score_adj']


@pytest.mark.kernel
def test_the_quick_btf_look_agrees_with_libbpf():
    with libbpf.Btf.load_vmlinux() as btf:
        struct_id = btf.struct('trace_event_raw_mark_victim')
        expected = [name for name, _type, _offset in btf.members(struct_id)]
        assert kernel.btf_struct_members('trace_event_raw_mark_victim') == expected
        assert task_hook_available() == mark_victim_passes_task(btf) == (True, '')


@pytest.mark.kernel
@pytest.mark.parametrize('name', ['task_struct', 'mm_struct', 'kernfs_node', 'bpf_map', 'oom_control'])
def test_the_quick_btf_look_is_exact_or_says_it_cannot_tell(name):
    with libbpf.Btf.load_vmlinux() as btf:
        members = [member for member, _type, _offset in btf.members(btf.struct(name))]
    quick = kernel.btf_struct_members(name)
    if '' in members:
        assert quick is None  # anonymous members: the quick look leaves it to libbpf
    else:
        assert quick == members


@pytest.mark.kernel
def test_the_quick_btf_look_of_a_missing_struct_is_none():
    assert kernel.btf_struct_members('no_such_struct_anywhere') is None


@pytest.mark.kernel
def test_kallsyms_ranges_are_the_functions_of_proc_kallsyms(root):
    symbols = kernel.KernelSymbols(MEMCG_OOM_FUNCTIONS | SYSTEM_OOM_FUNCTIONS)
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
