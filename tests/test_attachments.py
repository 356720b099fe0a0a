# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Where each program is attached, on real attachments, against bpftool's `link show`.

Each test attaches a program of its own through a link (a tracepoint, a cgroup, an interface of
a veth pair whose other end is in a network namespace the test makes, tcx, a kprobe) and finds
it in the snapshot with the target it was given. What a kernel says of a link comes from the
kernels' table (tests/kernels.py): before 6.6 a perf event link does not say what it probes.
"""

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from datadog_checks.ebpf_probe import EbpfProbeCheck
from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe
from datadog_checks.ebpf_probe.ebpf_stats.attachments import Attachment
from datadog_checks.ebpf_probe.kernel import features, libbpf

from . import kernels
from .bpf_objects import PROG_SOCKET_FILTER, RETURN_ZERO, bpftool
from .bpf_syscalls import (
    PROG_KPROBE,
    PROG_TRACEPOINT,
    attach_kprobe,
    attach_tracepoint,
    link_create,
    links_on_interface,
    prog_load,
)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
KERNEL = kernels.current()
CHECKOUT = Path(__file__).resolve().parent.parent

PROG_SCHED_CLS, PROG_XDP, PROG_CGROUP_SKB = 3, 6, 8
BPF_CGROUP_INET_INGRESS, BPF_XDP, BPF_TCX_INGRESS = 0, 37, 46
RETURN_ONE = bytes.fromhex('b700000001000000') + bytes.fromhex('9500000000000000')  # cgroup_skb: allow
RETURN_XDP_PASS = bytes.fromhex('b700000002000000') + bytes.fromhex('9500000000000000')


@pytest.fixture
def probe():
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    yield probe
    probe.close()


@pytest.fixture
def fds():
    """File descriptors a test opens (programs, links, perf events), closed after it."""
    opened: list[int] = []
    yield opened
    for fd in reversed(opened):
        os.close(fd)


def program_id(fd: int) -> int:
    return libbpf.prog_info(fd).id


def link_id(fd: int) -> int:
    data, _ = libbpf.link_info(fd)
    return int.from_bytes(data[4:8], 'little')


def attachments(probe, prog_fd: int) -> tuple[Attachment, ...]:
    [program] = [p for p in probe.snapshot().programs if p.id == program_id(prog_fd)]
    return program.attachments


def shown(link_fd: int) -> dict:
    [link] = [link for link in bpftool('link', 'show') if link['id'] == link_id(link_fd)]
    return link


def perf_event_says(kind: str, target: str) -> Attachment:
    """What a perf event link says of itself on this kernel: its kind and target from 6.6."""
    if KERNEL is not None and not KERNEL.perf_event_link_info:
        return Attachment('perf_event', None)
    return Attachment(kind, target)


def test_a_tracepoint(probe, fds):
    prog = prog_load(PROG_TRACEPOINT, 'att_tp', RETURN_ZERO)
    fds.append(prog)
    link, perf = attach_tracepoint(prog, features.ensure_tracefs(mount_allowed=True), 'sched', 'sched_process_fork')
    fds += [perf, link]
    [found] = attachments(probe, prog)
    if KERNEL is None:  # not in the table: either, but never another tracepoint
        assert found in (Attachment('tracepoint', 'sched_process_fork'), Attachment('perf_event', None))
    else:
        assert found == perf_event_says('tracepoint', 'sched_process_fork')
    assert shown(link)['type'] == 'perf_event' and shown(link)['prog_id'] == program_id(prog)


def unified_root() -> str:
    for root in ('/sys/fs/cgroup', '/sys/fs/cgroup/unified'):
        if os.path.exists(f'{root}/cgroup.controllers'):
            return root
    raise AssertionError('no cgroup v2 hierarchy mounted')


@pytest.fixture
def cgroup_v2():
    path = os.path.join(unified_root(), f'ebpf-probe-att-{uuid.uuid4().hex[:8]}')
    os.mkdir(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    yield path, fd
    os.close(fd)
    os.rmdir(path)


def test_a_cgroup_skb_program_on_a_cgroup(probe, fds, cgroup_v2):
    path, cgroup_fd = cgroup_v2
    prog = prog_load(PROG_CGROUP_SKB, 'att_cg', RETURN_ONE, expected_attach_type=BPF_CGROUP_INET_INGRESS)
    fds.append(prog)
    link = link_create(prog, cgroup_fd, BPF_CGROUP_INET_INGRESS, 'cgroup')
    fds.append(link)
    [found] = attachments(probe, prog)
    assert found == Attachment('cgroup', '/' + os.path.basename(path), 'cgroup_inet_ingress')
    link_shown = shown(link)
    assert link_shown['cgroup_id'] == os.stat(path).st_ino
    assert link_shown['attach_type'] == found.attach_type


@pytest.fixture
def veth_pair():
    """(the end in this network namespace, the network namespace, the end in it)."""
    tag = uuid.uuid4().hex[:6]
    namespace, here, there = f'ebpf-probe-{tag}', f'ep{tag}a', f'ep{tag}b'
    subprocess.run(['ip', 'netns', 'add', namespace], check=True)
    try:
        subprocess.run(['ip', 'link', 'add', here, 'type', 'veth', 'peer', 'name', there, 'netns', namespace],
                       check=True)  # fmt: skip
        subprocess.run(['ip', 'link', 'set', here, 'up'], check=True)
        yield here, namespace, there
    finally:
        subprocess.run(['ip', 'link', 'del', here], check=False)
        subprocess.run(['ip', 'netns', 'del', namespace], check=True)


def xdp_shown(namespace: str | None = None) -> list[dict]:
    """XDP programs on the interfaces of a network namespace, as `bpftool net` shows them (its
    link listing does not show an XDP link's interface before bpftool 7.3)."""
    command = ['bpftool', '-j', 'net', 'show']
    if namespace is not None:
        command = ['ip', 'netns', 'exec', namespace, *command]
    [shown] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return [{key: device[key] for key in ('devname', 'ifindex', 'id')} for device in shown['xdp']]


# Attaches an XDP program to an interface of the network namespace it runs in, says the program's id
# and the interface's index there, and holds the link until stdin closes.
XDP_IN_NAMESPACE = f"""
import os, socket, sys
sys.path.insert(0, {str(CHECKOUT)!r})
from datadog_checks.ebpf_probe.kernel import libbpf
from tests.bpf_syscalls import link_create, prog_load
from tests.test_attachments import BPF_XDP, PROG_XDP, RETURN_XDP_PASS
prog = prog_load(PROG_XDP, 'att_xdp_ns', RETURN_XDP_PASS, expected_attach_type=BPF_XDP)
ifindex = socket.if_nametoindex(sys.argv[1])
link = link_create(prog, ifindex, BPF_XDP, 'xdp')
print(libbpf.prog_info(prog).id, ifindex, flush=True)
sys.stdin.read()
"""


def test_xdp_on_an_interface_here_is_named_and_in_another_namespace_is_not(probe, fds, veth_pair):
    here, namespace, there = veth_pair
    prog = prog_load(PROG_XDP, 'att_xdp', RETURN_XDP_PASS, expected_attach_type=BPF_XDP)
    fds.append(prog)
    link = link_create(prog, socket.if_nametoindex(here), BPF_XDP, 'xdp')
    fds.append(link)
    holder = subprocess.Popen(['ip', 'netns', 'exec', namespace, sys.executable, '-c', XDP_IN_NAMESPACE, there],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        other_prog, other_ifindex = (int(word) for word in holder.stdout.readline().split())
        assert attachments(probe, prog) == (Attachment('xdp', here),)
        assert {'devname': here, 'ifindex': socket.if_nametoindex(here), 'id': program_id(prog)} in xdp_shown()
        [program] = [p for p in probe.snapshot().programs if p.id == other_prog]
        # An index names an interface only in its own namespace: said as such, never another's name.
        assert program.attachments == (Attachment('xdp', f'ifindex {other_ifindex} (another network namespace)'),)
        assert {'devname': there, 'ifindex': other_ifindex, 'id': other_prog} in xdp_shown(namespace)
    finally:
        holder.stdin.close()
        holder.wait()


def test_tcx_where_the_kernel_has_it(probe, fds, veth_pair):
    here = veth_pair[0]
    prog = prog_load(PROG_SCHED_CLS, 'att_tcx', RETURN_ZERO, expected_attach_type=BPF_TCX_INGRESS)
    fds.append(prog)
    has_tcx = KERNEL.tcx if KERNEL is not None else None
    try:
        link = link_create(prog, socket.if_nametoindex(here), BPF_TCX_INGRESS, 'tcx')
    except OSError as e:
        assert has_tcx is not True, f'{KERNEL.name} has tcx, but: {e}'
        assert e.errno in (errno.EINVAL, errno.EOPNOTSUPP)  # a kernel before 6.6: no such attach type
        return
    fds.append(link)
    assert has_tcx is not False
    assert attachments(probe, prog) == (Attachment('tcx', here, 'tcx_ingress'),)
    # bpftool 7.1 does not know tcx links: the kernel's own list of the interface's links does.
    assert links_on_interface(socket.if_nametoindex(here), BPF_TCX_INGRESS) == [link_id(link)]


def test_a_kprobe_where_the_kernel_has_them(probe, fds):
    prog = prog_load(PROG_KPROBE, 'att_kprobe', RETURN_ZERO)
    fds.append(prog)
    try:
        link, perf = attach_kprobe(prog, 'do_sys_openat2')
    except OSError as e:
        assert kernels.has_kprobes() is not True, f'kprobes are there, but: {e}'
        return
    fds += [perf, link]
    assert kernels.has_kprobes() is not False
    [found] = attachments(probe, prog)
    if KERNEL is None:
        assert found in (Attachment('kprobe', 'do_sys_openat2'), Attachment('perf_event', None))
    else:
        assert found == perf_event_says('kprobe', 'do_sys_openat2')


def test_every_link_bpftool_lists_is_an_attachment_of_its_program(probe, fds, cgroup_v2):
    prog = prog_load(PROG_CGROUP_SKB, 'att_every', RETURN_ONE, expected_attach_type=BPF_CGROUP_INET_INGRESS)
    fds.append(prog)
    fds.append(link_create(prog, cgroup_v2[1], BPF_CGROUP_INET_INGRESS, 'cgroup'))
    snapshot = probe.snapshot()
    listed = bpftool('link', 'show')
    by_program: dict[int, int] = {}
    for link in listed:
        by_program[link['prog_id']] = by_program.get(link['prog_id'], 0) + 1
    ours = {p.id: len(p.attachments) for p in snapshot.programs if p.attachments}
    assert ours[program_id(prog)] == by_program[program_id(prog)] == 1
    # Every program both saw has as many attachments as bpftool lists links of it (another
    # process's link made or freed between the two reads may be in one only).
    both = ours.keys() & by_program.keys()
    assert {i: ours[i] for i in both} == {i: by_program[i] for i in both}
    assert len(both) >= len(by_program) - 2


def test_the_check_reports_attachments_and_programs_without_a_link(dd_run_check, aggregator, fds, cgroup_v2):
    path, cgroup_fd = cgroup_v2
    attached = prog_load(PROG_CGROUP_SKB, 'att_check', RETURN_ONE, expected_attach_type=BPF_CGROUP_INET_INGRESS)
    unattached = prog_load(PROG_SOCKET_FILTER, 'att_none', RETURN_ZERO)
    fds += [attached, unattached]
    fds.append(link_create(attached, cgroup_fd, BPF_CGROUP_INET_INGRESS, 'cgroup'))
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_oom_kill': False}])
    try:
        dd_run_check(check)
    finally:
        check.cancel()
    me = open('/proc/self/comm').read().strip()
    series = [f'owner:{me}', 'ebpf_probe_self:true']
    aggregator.assert_metric(
        'ebpf_probe.program.attachments',
        value=1,
        count=1,
        tags=['program_name:att_check', 'program_type:cgroup_skb', *series, 'attach_type:cgroup_inet_ingress',
              f'attach_target:/{os.path.basename(path)}'],
    )  # fmt: skip
    aggregator.assert_metric(
        'ebpf_probe.program.attachments',
        value=0,
        count=1,
        tags=['program_name:att_none', 'program_type:socket_filter', *series, 'attach_type:no_link'],
    )
