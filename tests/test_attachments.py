# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Where each program is attached, on real attachments, against bpftool's `link show`.

Each test attaches a program of its own through a link (a tracepoint, a cgroup, an interface of
a veth pair whose other end is in a network namespace the test makes, tcx, a kprobe) and finds
it in the snapshot with the target it was given. What a kernel says of a link comes from the
kernels' table (tests/kernels.py): before 6.6 a perf event link does not say what it probes.
"""

import json
import logging
import os
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


def perf_event_links() -> bool | None:
    return KERNEL.perf_event_links if KERNEL is not None else None


def test_a_tracepoint(probe, fds):
    prog = prog_load(PROG_TRACEPOINT, 'att_tp', RETURN_ZERO)
    fds.append(prog)
    tracefs = features.ensure_tracefs(mount_allowed=True)
    try:
        link, perf = attach_tracepoint(prog, tracefs, 'sched', 'sched_process_fork')
    except OSError as e:
        assert perf_event_links() is not True, f'{KERNEL.name} links perf events, but: {e}'
        return attached_without_a_link(
            probe, fds, prog, attach_tracepoint(prog, tracefs, 'sched', 'sched_process_fork', link=False)
        )
    fds += [perf, link]
    assert perf_event_links() is not False
    [found] = attachments(probe, prog)
    if KERNEL is None:  # not in the table: either, but never another tracepoint
        assert found in (Attachment('tracepoint', 'sched_process_fork'), Attachment('perf_event', None))
    else:
        assert found == perf_event_says('tracepoint', 'sched_process_fork')
    assert shown(link)['type'] == 'perf_event' and shown(link)['prog_id'] == program_id(prog)


def attached_without_a_link(probe, fds, prog, attached) -> None:
    """A kernel before 5.15 attaches through the perf event's ioctl (BCC's way on every kernel): no
    link to read, so no attachment; the check counts the program as no_link, not as missing."""
    fds.append(attached[1])
    assert attached[0] is None
    assert attachments(probe, prog) == ()


def test_a_tracepoint_attached_as_bcc_does_has_no_link_and_is_said_so(probe, fds, dd_run_check, aggregator):
    prog = prog_load(PROG_TRACEPOINT, 'att_tp_ioctl', RETURN_ZERO)
    fds.append(prog)
    tracefs = features.ensure_tracefs(mount_allowed=True)
    attached_without_a_link(
        probe, fds, prog, attach_tracepoint(prog, tracefs, 'sched', 'sched_process_fork', link=False)
    )
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_oom_kill': False}])
    try:
        dd_run_check(check)
    finally:
        check.cancel()
    me = open('/proc/self/comm').read().strip()
    aggregator.assert_metric(
        'ebpf_probe.program.attachments',
        value=0,
        count=1,
        tags=['program_name:att_tp_ioctl', 'program_type:tracepoint', f'owner:{me}', 'ebpf_probe_self:true',
              'attach_type:no_link'],
    )  # fmt: skip


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
def namespaces():
    """Two network namespaces of the test's own (each has its loopback, index 1 in both: an index
    names an interface only in its namespace). Interfaces need no kernel module there."""
    made = [f'ebpf-probe-{uuid.uuid4().hex[:6]}' for _ in range(2)]
    for namespace in made:
        subprocess.run(['ip', 'netns', 'add', namespace], check=True)
    try:
        yield made
    finally:
        for namespace in made:
            subprocess.run(['ip', 'netns', 'del', namespace], check=True)


# Runs in a network namespace: attaches a program (xdp, or tcx ingress) to its loopback, then
# either holds it until stdin closes ('hold') or takes a snapshot there ('report'), and prints JSON:
# the program's id, the interface's index, the links on it as the kernel lists them (tcx), and the
# attachments the snapshot gives its program and the programs whose ids follow.
ATTACH_IN_NAMESPACE = f"""
import json, logging, socket, sys
sys.path.insert(0, {str(CHECKOUT)!r})
from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe
from datadog_checks.ebpf_probe.kernel import libbpf
from tests.bpf_syscalls import link_create, links_on_interface, prog_load
from tests.test_attachments import BPF_TCX_INGRESS, BPF_XDP, PROG_SCHED_CLS, PROG_XDP, RETURN_XDP_PASS
from tests.bpf_objects import RETURN_ZERO
kind, mode, others = sys.argv[1], sys.argv[2], [int(i) for i in sys.argv[3:]]
ifindex = socket.if_nametoindex('lo')
if kind == 'xdp':
    prog = prog_load(PROG_XDP, 'att_xdp', RETURN_XDP_PASS, expected_attach_type=BPF_XDP)
    link = link_create(prog, ifindex, BPF_XDP, 'xdp')
else:
    prog = prog_load(PROG_SCHED_CLS, 'att_tcx', RETURN_ZERO, expected_attach_type=BPF_TCX_INGRESS)
    link = link_create(prog, ifindex, BPF_TCX_INGRESS, 'tcx')
said = {{'prog': libbpf.prog_info(prog).id, 'ifindex': ifindex}}
if kind == 'tcx':
    said['kernel_links'] = links_on_interface(ifindex, BPF_TCX_INGRESS)
    said['link'] = int.from_bytes(libbpf.link_info(link)[0][4:8], 'little')
if mode == 'report':
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), logging.getLogger('ns'))
    wanted = [said['prog'], *others]
    said['attachments'] = {{
        str(p.id): [[a.kind, a.target, a.attach_type] for a in p.attachments]
        for p in probe.snapshot().programs if p.id in wanted
    }}
    probe.close()
print(json.dumps(said), flush=True)
if mode == 'hold':
    sys.stdin.read()
"""


def in_namespace(namespace: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(['ip', 'netns', 'exec', namespace, sys.executable, '-c', ATTACH_IN_NAMESPACE, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip


def xdp_shown(namespace: str) -> list[dict]:
    """XDP programs on the interfaces of a network namespace, as `bpftool net` shows them (its
    link listing does not show an XDP link's interface before bpftool 7.3)."""
    command = ['ip', 'netns', 'exec', namespace, 'bpftool', '-j', 'net', 'show']
    [shown] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return [{key: device[key] for key in ('devname', 'ifindex', 'id')} for device in shown['xdp']]


def test_xdp_on_an_interface_here_is_named_and_in_another_namespace_is_not(namespaces):
    here, elsewhere = namespaces
    holder = in_namespace(elsewhere, 'xdp', 'hold')
    try:
        other = json.loads(holder.stdout.readline())
        reporter = in_namespace(here, 'xdp', 'report', str(other['prog']))
        said, _ = reporter.communicate(timeout=120)
        assert reporter.returncode == 0
        said = json.loads(said)
        # Both on their namespace's loopback, index 1 in both: named only where the check runs.
        assert said['ifindex'] == other['ifindex']
        assert said['attachments'][str(said['prog'])] == [['xdp', 'lo', None]]
        assert said['attachments'][str(other['prog'])] == [
            ['xdp', f'ifindex {other["ifindex"]} (another network namespace)', None]
        ]
        assert {'devname': 'lo', 'ifindex': other['ifindex'], 'id': other['prog']} in xdp_shown(elsewhere)
    finally:
        holder.stdin.close()
        holder.wait()


def test_tcx_where_the_kernel_has_it(namespaces):
    reporter = in_namespace(namespaces[0], 'tcx', 'report')
    said, _ = reporter.communicate(timeout=120)
    has_tcx = KERNEL.tcx if KERNEL is not None else None
    if reporter.returncode != 0:  # a kernel before 6.6: no such attach type (link_create fails)
        assert has_tcx is not True, f'{KERNEL.name} has tcx, but the link was refused'
        return
    assert has_tcx is not False
    said = json.loads(said)
    assert said['attachments'][str(said['prog'])] == [['tcx', 'lo', 'tcx_ingress']]
    # bpftool 7.1 does not know tcx links: the kernel's own list of the interface's links does.
    assert said['kernel_links'] == [said['link']]


def test_a_kprobe_where_the_kernel_has_them(probe, fds):
    prog = prog_load(PROG_KPROBE, 'att_kprobe', RETURN_ZERO)
    fds.append(prog)
    try:
        link, perf = attach_kprobe(prog, 'do_sys_openat2')
    except OSError as e:
        if kernels.has_kprobes() and perf_event_links() is not True:  # kprobes, but no perf event links
            return attached_without_a_link(probe, fds, prog, attach_kprobe(prog, 'do_sys_openat2', link=False))
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
