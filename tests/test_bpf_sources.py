# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What the Python side mirrors of the BPF sources by hand, held against them: a change on one side
that the other does not follow fails here (the record's layout has its BTF test in
test_oom_kill_probe.py)."""

import re
from pathlib import Path

import pytest

from datadog_checks.ebpf_probe.oom_kill import record as r
from datadog_checks.ebpf_probe.oom_kill.bcc import _BTF_ENUMS, _BTF_OFFSETS

pytestmark = pytest.mark.unit

BPF = Path(__file__).parents[1] / 'bpf'


def header_defines(name: str) -> dict[str, int]:
    """The integer OOM_* #defines of a header of bpf/, with (1U << n) worked out."""
    defines = {}
    for macro, value in re.findall(r'^#define (OOM_\w+)\s+(\(1U << \d+\)|\d+)', (BPF / name).read_text(), re.M):
        shift = re.fullmatch(r'\(1U << (\d+)\)', value)
        defines[macro] = 1 << int(shift.group(1)) if shift else int(value)
    return defines


def test_the_decoders_flags_hook_ids_and_sizes_are_the_headers():
    defines = header_defines('oom_kill.h')
    mirrored = {
        **{f'OOM_F_{name[2:]}': value for name, value in vars(r).items() if name.startswith('F_')},
        **{f'OOM_HOOK_{name[5:]}': value for name, value in vars(r).items() if name.startswith('HOOK_')},
        'OOM_COMM_LEN': r.COMM_LEN,
        'OOM_CGROUP_MAX_DEPTH': r.CGROUP_MAX_DEPTH,
        'OOM_CGROUP_NAME_LEN': r.CGROUP_NAME_LEN,
        'OOM_STACK_DEPTH': r.STACK_DEPTH,
        'OOM_MEMCG_EVENTS': r.MEMCG_EVENTS,
        'OOM_DROPPED_KERNEL': r.DROPPED_KERNEL,
        'OOM_DROPPED_SIGNAL': r.DROPPED_SIGNAL,
    }
    assert mirrored == defines


def test_the_bcc_variant_gets_the_same_offsets_from_btf_as_from_kernel_headers():
    """oom_kill_bcc.c reads the kernel at OFF_* offsets: defined from the kernel headers in its
    OFFSETS_FROM_HEADERS block, or by bcc.py from BTF; both must define every one it reads."""
    source = (BPF / 'oom_kill_bcc.c').read_text()
    block = source[source.index('#ifdef OFFSETS_FROM_HEADERS') : source.index('#endif /* OFFSETS_FROM_HEADERS */')]
    from_headers = set(re.findall(r'^#define (\w+)', block, re.M))
    from_btf = (
        set(_BTF_OFFSETS)
        | set(_BTF_ENUMS)
        | {'RSS_STAT_STRIDE', 'OFF_RSS_COUNT', 'UPID_SIZE', 'MEMORY_CGRP_ID', 'CGROUP_PSI_IS_POINTER'}
    )
    read = set(
        re.findall(
            r'\b(OFF_\w+|UPID_SIZE|RSS_STAT_STRIDE|MEMORY_CGRP_ID|MEMCG_EVENT_\w+|PSI_MEM_\w+_ROW|CGROUP_PSI_IS_POINTER)\b',
            source.replace(block, ''),
        )
    )
    assert from_headers == from_btf
    assert read <= from_btf


def kernel_types_members() -> dict[str, set[str]]:
    """struct -> the members bpf/kernel_types.h declares for CO-RE, its flavors (struct x___y) merged in."""
    members: dict[str, set[str]] = {}
    source = (BPF / 'kernel_types.h').read_text()
    for name, body in re.findall(r'^struct (\w+) \{(.*?)^\}', source, re.M | re.S):
        members.setdefault(name.split('___')[0], set()).update(re.findall(r'(\w+)(?:\[[^\]]*\])*;', body))
    return members


def test_both_variants_read_the_same_fields_of_the_kernels_structs():
    """The CO-RE variant reads what kernel_types.h declares; the BCC variant what _BTF_OFFSETS lists.
    For every kernel struct the BCC variant reads, the two lists name the same members."""
    by_bcc: dict[str, set[str]] = {}
    for struct_name, paths in _BTF_OFFSETS.values():
        by_bcc.setdefault(struct_name, set()).update(path.split('.')[0] for path in paths)
    by_core = kernel_types_members()
    assert {name: by_core.get(name, set()) for name in by_bcc} == by_bcc
