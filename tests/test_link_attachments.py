# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""bpf_link_info -> where a link attaches its program, for every link type (pure decoding)."""

import struct

import pytest

from datadog_checks.ebpf_probe.ebpf_stats import attachments
from datadog_checks.ebpf_probe.ebpf_stats.attachments import Attachment, describe

pytestmark = pytest.mark.unit

PROG = 9


class FakeNames:
    def __init__(self, here=True):
        self.here = here

    def attach_type(self, attach_type):
        return {0: 'cgroup_inet_ingress', 36: 'sk_lookup', 46: 'tcx_ingress', 47: 'tcx_egress'}[attach_type]

    def btf_type(self, btf_object_id, type_id):
        return {(1, 100): 'do_unlinkat', (1, 200): 'bpf_lsm_file_open', (1, 300): 'btf_trace_sched_switch'}.get(
            (btf_object_id, type_id)
        )

    def cgroup(self, cgroup_id):
        return {42: '/kubepods.slice/pod-a'}.get(cgroup_id)

    def interface(self, ifindex, prog_id, attach_type):
        return 'eth0' if self.here and ifindex == 2 else None

    def functions(self, addresses):
        return [{0xFFFF1000: 'vfs_read', 0xFFFF2000: 'vfs_write'}.get(a) for a in addresses]


def info(link_type, union=b''):
    return struct.pack('<IIII', link_type, 3, PROG, 0) + union.ljust(112, b'\0')


def name(text):
    return text.encode() + b'\0'


@pytest.mark.parametrize(
    'link_type, union, buffer, expected',
    [
        (attachments.RAW_TRACEPOINT, b'', name('mark_victim'), Attachment('raw_tracepoint', 'mark_victim')),
        (attachments.TRACING, struct.pack('<III', 24, 1, 100), b'', Attachment('fentry', 'do_unlinkat')),
        (attachments.TRACING, struct.pack('<III', 25, 1, 100), b'', Attachment('fexit', 'do_unlinkat')),
        (attachments.TRACING, struct.pack('<III', 27, 1, 200), b'', Attachment('lsm', 'file_open')),
        (attachments.TRACING, struct.pack('<III', 23, 1, 300), b'', Attachment('tp_btf', 'sched_switch')),
        (attachments.TRACING, struct.pack('<III', 24, 0, 0), b'', Attachment('fentry', None)),  # before 5.13
        (attachments.TRACING, struct.pack('<III', 0, 77, 5), b'', Attachment('freplace', 'program 77')),
        (attachments.CGROUP, struct.pack('<QI', 42, 0), b'',
         Attachment('cgroup', '/kubepods.slice/pod-a', 'cgroup_inet_ingress')),
        (attachments.CGROUP, struct.pack('<QI', 43, 0), b'', Attachment('cgroup', None, 'cgroup_inet_ingress')),
        (attachments.ITER, struct.pack('<QII', 0, 16, 12), name('bpf_map_elem'),
         Attachment('iterator', 'bpf_map_elem (map 12)')),
        (attachments.ITER, b'', name('task_file'), Attachment('iterator', 'task_file')),
        (attachments.NETNS, struct.pack('<II', 4026531840, 36), b'',
         Attachment('netns', 'net:[4026531840]', 'sk_lookup')),
        (attachments.XDP, struct.pack('<I', 2), b'', Attachment('xdp', 'eth0')),
        (attachments.XDP, struct.pack('<I', 5), b'', Attachment('xdp', 'ifindex 5 (another network namespace)')),
        (attachments.TCX, struct.pack('<II', 2, 47), b'', Attachment('tcx', 'eth0', 'tcx_egress')),
        (attachments.PERF_EVENT, struct.pack('<IIQII', 3, 0, 0, 16, 0), name('do_sys_openat2'),
         Attachment('kprobe', 'do_sys_openat2')),
        (attachments.PERF_EVENT, struct.pack('<IIQII', 4, 0, 0, 16, 0x10), name('do_exit'),
         Attachment('kretprobe', 'do_exit+0x10')),
        (attachments.PERF_EVENT, struct.pack('<IIQII', 1, 0, 0, 16, 0x1234), name('/usr/lib/libc.so.6'),
         Attachment('uprobe', '/usr/lib/libc.so.6+0x1234')),
        (attachments.PERF_EVENT, struct.pack('<IIQI', 5, 0, 0, 16), name('sched_process_fork'),
         Attachment('tracepoint', 'sched_process_fork')),
        (attachments.PERF_EVENT, b'', b'', Attachment('perf_event', None)),  # before 6.6: the kernel says nothing
        (attachments.KPROBE_MULTI, struct.pack('<QII', 0, 2, 0), struct.pack('<QQ', 0xFFFF1000, 0xFFFF2000),
         Attachment('kprobe_multi', 'vfs_read and 1 more')),
        (attachments.KPROBE_MULTI, struct.pack('<QII', 0, 3, 1), bytes(24),
         Attachment('kretprobe_multi', '3 functions')),
        (attachments.UPROBE_MULTI, struct.pack('<QQQQIIII', 0, 0, 0, 0, 20, 1, 1, 0), name('/usr/bin/python3'),
         Attachment('uretprobe_multi', '/usr/bin/python3')),
        (attachments.STRUCT_OPS, struct.pack('<I', 8), b'', Attachment('struct_ops', 'map 8')),
        (attachments.NETFILTER, struct.pack('<IIi', 2, 1, -100), b'',
         Attachment('netfilter', 'ipv4 hook 1 priority -100')),
        (99, b'', b'', Attachment('link_type_99', None)),
    ],
)  # fmt: skip
def test_each_link_type_says_where_it_attaches(link_type, union, buffer, expected):
    assert describe(link_type, PROG, info(link_type, union), buffer, FakeNames()) == expected


def test_an_interface_not_known_here_is_never_given_a_name():
    data = info(attachments.TCX, struct.pack('<II', 2, 46))
    assert describe(attachments.TCX, PROG, data, b'', FakeNames(here=False)) == Attachment(
        'tcx', 'ifindex 2 (another network namespace)', 'tcx_ingress'
    )
