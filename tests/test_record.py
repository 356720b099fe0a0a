# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Decoding the record the BPF side writes: pure logic, records made field by field."""

import pytest

from datadog_checks.ebpf_probe.oom_kill import hooks
from datadog_checks.ebpf_probe.oom_kill import record as r
from datadog_checks.ebpf_probe.oom_kill.record import (
    CGROUP_NAME_LEN,
    RECORD,
    RECORD_FIELDS,
    STACK_DEPTH,
    decode_record,
    memcg_from_stack,
)

pytestmark = pytest.mark.unit

MEMCG_PATH = (0x1000, 0x1100)  # mem_cgroup_out_of_memory
SYSTEM_PATH = (0x2000, 0x2100)  # out_of_memory
OTHER = (0x3000, 0x3100)  # any other function


class Symbols:
    def __init__(self, ranges):
        self.ranges = ranges

    def find(self, address):
        return next((name for name, (start, end) in self.ranges.items() if start <= address < end), None)


SYMBOLS = Symbols({'mem_cgroup_out_of_memory': MEMCG_PATH, 'out_of_memory': SYSTEM_PATH, 'handle_mm_fault': OTHER})


def raw_record(**fields) -> bytes:
    values = {
        'timestamp_ns': 2_000_000_000,
        'victim_pid': 100,
        'victim_tid': 101,
        'victim_uid': 1000,
        'trigger_pid': 100,
        'trigger_tid': 101,
        'oom_score_adj': -5,
        'hook': r.HOOK_TP_BTF,
        'victim_comm': b'victim',
        'trigger_comm': b'trigger',
        **fields,
    }
    stack = values.pop('kernel_stack', ())
    names = values.pop('cgroup_names', [])
    packed = []
    for name, layout in RECORD_FIELDS:
        if name == 'kernel_stack':
            packed += list(stack) + [0] * (STACK_DEPTH - len(stack))
        elif name == 'cgroup_names':
            packed.append(b''.join(n.ljust(CGROUP_NAME_LEN, b'\0')[:CGROUP_NAME_LEN] for n in names))
        elif layout.endswith('s'):
            packed.append(values.get(name, b''))
        elif not layout.endswith('x'):
            count = int(layout[:-1] or 1)
            packed += list(values.get(name, (0,) * count)) if count > 1 else [values.get(name, 0)]
    return RECORD.pack(*packed)


def decode(**fields):
    return decode_record(raw_record(**fields), 1_700_000_000.0, SYMBOLS, hooks.HOOK_NAMES)


def test_the_victim_and_trigger_and_time():
    kill = decode(flags=r.F_VICTIM_TASK)
    assert (kill.victim_pid, kill.victim_tid, kill.victim_comm, kill.victim_uid) == (100, 101, 'victim', 1000)
    assert (kill.trigger_pid, kill.trigger_tid, kill.trigger_comm) == (100, 101, 'trigger')
    assert kill.oom_score_adj == -5
    assert kill.timestamp == 1_700_000_002.0
    assert kill.hook == 'tp_btf/mark_victim'


def test_without_the_task_there_is_no_name_uid_or_score():
    kill = decode(flags=0)
    assert (kill.victim_comm, kill.victim_uid, kill.oom_score_adj) == (None, None, None)


def test_a_thread_only_victim_has_no_pid():
    kill = decode(flags=r.F_VICTIM_PID_UNKNOWN, victim_pid=0, victim_tid=4242, hook=r.HOOK_TRACEPOINT)
    assert kill.victim_pid is None and kill.victim_tid == 4242
    assert kill.hook == 'tracepoint/oom/mark_victim'


def test_an_unknown_hook_number_is_shown_as_is():
    assert decode(hook=77).hook == '77'


@pytest.mark.parametrize(
    'flags, stack, memcg',
    [
        (r.F_CONSTRAINT_KNOWN | r.F_MEMCG, (), True),  # from oom_control
        (r.F_CONSTRAINT_KNOWN, (MEMCG_PATH[0] + 8,), False),  # oom_control wins over the stack
        (0, (OTHER[0], MEMCG_PATH[0] + 0x10, SYSTEM_PATH[0]), True),  # the memcg path on the stack
        (0, (OTHER[0], SYSTEM_PATH[0] + 4), False),  # only the OOM killer's entry: the whole system
        (0, (OTHER[0], 0x9999), None),  # neither: unknown
        (0, (), None),
    ],
    ids=['oom_control-memcg', 'oom_control-system', 'stack-memcg', 'stack-system', 'stack-unknown', 'no-stack'],
)
def test_memcg_or_system(flags, stack, memcg):
    kill = decode(flags=flags, kernel_stack=stack, kernel_stack_depth=len(stack))
    assert kill.memcg_oom is memcg
    assert kill.trigger_type == {True: 'cgroup', False: 'system', None: 'unknown'}[memcg]


def test_frames_past_the_stack_depth_are_not_read():
    stack = (OTHER[0], MEMCG_PATH[0])
    assert decode(kernel_stack=stack, kernel_stack_depth=1).memcg_oom is None


def test_kallsyms_without_addresses_tells_nothing():
    hidden = Symbols({})  # kptr_restrict: every address reads 0, no range is known
    assert memcg_from_stack((MEMCG_PATH[0], SYSTEM_PATH[0]), hidden) is None


def test_a_cgroup_path_is_read_leaf_first():
    kill = decode(flags=r.F_CGROUP, cgroup_id=77, cgroup_depth=3, cgroup_names=[b'leaf', b'mid', b'top'])
    assert kill.cgroup_path == '/top/mid/leaf'
    assert kill.cgroup_name == 'leaf'
    assert kill.cgroup_id == 77
    assert kill.cgroup_path_truncated is False


def test_the_root_cgroup_is_slash():
    kill = decode(flags=r.F_CGROUP, cgroup_depth=0)
    assert kill.cgroup_path == '/' and kill.cgroup_name == '/'


def test_a_path_deeper_than_kept_starts_with_an_ellipsis():
    names = [f'l{i}'.encode() for i in range(8)]
    kill = decode(flags=r.F_CGROUP | r.F_CGROUP_DEPTH_TRUNCATED, cgroup_depth=8, cgroup_names=names)
    assert kill.cgroup_path == '/.../l7/l6/l5/l4/l3/l2/l1/l0'
    assert kill.cgroup_path_truncated is True


def test_a_long_name_is_cut_but_the_path_keeps_its_depth():
    long_name = b'x' * 127
    kill = decode(flags=r.F_CGROUP | r.F_CGROUP_NAME_TRUNCATED, cgroup_depth=2, cgroup_names=[long_name, b'top'])
    assert kill.cgroup_path == '/top/' + 'x' * 127  # no ellipsis: no level is missing
    assert kill.cgroup_path_truncated is True


def test_cgroup_fields_without_the_flag_are_ignored():
    kill = decode(flags=0, cgroup_id=5, cgroup_depth=2, cgroup_names=[b'a', b'b'])
    assert (kill.cgroup_path, kill.cgroup_id, kill.cgroup_name) == (None, None, None)


def test_memory_and_oom_control_only_with_their_flags():
    fields = {'total_vm_kb': 10, 'anon_rss_kb': 4, 'file_rss_kb': 2, 'shmem_rss_kb': 1, 'pgtables_kb': 3,
              'oom_domain_pages': 8192, 'badness_points': -7}  # fmt: skip
    bare = decode(**fields)
    assert bare.memory is None and bare.oom_domain_pages is None and bare.badness_points is None
    full = decode(flags=r.F_MEMORY | r.F_OOM_CONTROL | r.F_CHOSEN, **fields)
    assert full.memory.rss_kb == 7 and full.memory.total_vm_kb == 10 and full.memory.pgtables_kb == 3
    assert (full.oom_domain_pages, full.badness_points) == (8192, -7)


def test_names_that_are_not_utf8_stay_visible():
    kill = decode(flags=r.F_VICTIM_TASK, victim_comm=b'\xffbad\x00junk', trigger_comm=b'ok')
    assert kill.victim_comm == '\\xffbad'
