# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Reliability: no leaks, no privileges, missing kernel features, hostile names, overflow, concurrency."""

import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from datadog_checks.base import AgentCheck
from datadog_checks.base.stubs import aggregator as stub_aggregator
from datadog_checks.ebpf_probe import EbpfProbeCheck, lifecycle
from datadog_checks.ebpf_probe import check as check_module
from datadog_checks.ebpf_probe.kernel import bcc as bcc_loader
from datadog_checks.ebpf_probe.kernel import btf as kernel
from datadog_checks.ebpf_probe.oom_kill.probe import RING_SAMPLE_SIZE

from . import kernels
from .bpf_objects import bpftool
from .cgroups import MemoryCgroup
from .processes import UNTIL_TOLD, next_run_now, read_until

KERNEL = kernels.current()

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

EBPF_PROBE = str(Path(sys.executable).parent / 'ebpf-probe')
CAN_LOAD = 'ebpf_probe.probe.can_load'
UNSAFE_TAG = re.compile(r'[\s,|#\x00-\x1f\x7f-\x9f]')


def kernel_objects() -> dict[str, set[int]]:
    return {kind: {o['id'] for o in bpftool(kind, 'show')} for kind in ('prog', 'map', 'link')}


def wait_for_objects(expected: dict[str, set[int]], timeout: float = 15.0) -> dict[str, set[int]]:
    """The kernel frees BPF objects a little after their last reference goes: wait, do not flake."""
    deadline = time.monotonic() + timeout
    while (now := kernel_objects()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def settled_objects() -> dict[str, set[int]]:
    """What the kernel holds once objects closed just before are really gone (freed after an RCU grace)."""
    previous = kernel_objects()
    for _ in range(50):
        time.sleep(0.2)
        current = kernel_objects()
        if current == previous:
            return current
        previous = current
    return previous


def open_fds() -> set[str]:
    return set(os.listdir('/proc/self/fd'))


def rss_mb() -> float:
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith('VmRSS:')).split()[1]) / 1024


# --- No leaks ---------------------------------------------------------------------------------------


# Create, run, cancel: 300 times on a host; in a VM row (an emulated CPU, ~5x slower) 60, which still
# shows a leaked object or fd in one cycle, and a memory leak of 80 kB a cycle.
CYCLES = 60 if os.environ.get('EBPF_PROBE_VM_ROW') else 300


@pytest.mark.slow
def test_create_run_cancel_cycles_leave_nothing_behind():
    def cycle():
        check = EbpfProbeCheck('ebpf_probe', {}, [{}])
        assert check.run() == ''
        check.cancel()
        stub_aggregator.reset()

    cycle()  # warm up: imports, the BTF and kallsyms caches, the first libbpf allocations
    before, fds, rss = settled_objects(), open_fds(), rss_mb()
    for _ in range(CYCLES):
        cycle()
    assert wait_for_objects(before) == before
    assert open_fds() == fds
    assert rss_mb() - rss < 5


def test_nothing_is_left_after_the_cli_exits():
    before = settled_objects()
    result = subprocess.run([EBPF_PROBE, 'check', '-t', '2'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert wait_for_objects(before) == before


def test_nothing_is_left_after_a_sigterm_mid_run():
    before = settled_objects()
    proc = subprocess.Popen(
        [EBPF_PROBE, 'check', '-t', '1000', '--pause', '20', '-l', 'info'],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until(proc.stderr, 'run 1 of 1000 finished')
        assert kernel_objects() != before  # its probes are loaded
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert wait_for_objects(before) == before


# --- Privileges -------------------------------------------------------------------------------------


def run_in_child_as_nobody(function):
    """Run function() in a forked child that dropped to uid/gid 65534 and every capability."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            result = function()
        except BaseException as e:  # report anything to the parent
            result = {'error': repr(e)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(b''.join(chunks))


def test_as_an_unprivileged_user_the_check_says_which_capabilities_are_missing():
    def runs_as_nobody():
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.DEBUG)
        clock = [1000.0]
        lifecycle.time.monotonic = lambda: clock[0]
        attempts = []
        loader = check_module.load_oom_kill_probe

        def counting_loader(*args):
            attempts.append(1)
            return loader(*args)

        check_module.load_oom_kill_probe = counting_loader
        stub_aggregator.reset()
        check = EbpfProbeCheck('ebpf_probe', {}, [{}])
        errors = []
        for advance in (0, 0, 0, 15, 0, 30):  # same instant thrice, then the 15 s and 30 s backoffs
            clock[0] += advance
            errors.append(check.run())
        statuses = [(sc.tags[0], sc.status, sc.message) for sc in stub_aggregator.service_checks(CAN_LOAD)]
        return {
            'uid': os.getuid(),
            'errors': errors,
            'statuses': statuses,
            'attempts': len(attempts),
            'warnings': [r.getMessage() for r in records if r.levelno >= logging.WARNING],
            'tracebacks': [r.getMessage() for r in records if r.exc_info],
        }

    result = run_in_child_as_nobody(runs_as_nobody)
    assert 'error' not in result, result
    assert result['uid'] == 65534
    assert result['errors'] == [''] * 6  # run() never raised
    statuses = result['statuses']
    assert len(statuses) == 12
    # OOM kills cannot run: CRITICAL; the optional eBPF stats are not granted: WARNING.
    assert {(probe, status) for probe, status, _ in statuses} == {
        ('probe:oom_kill', AgentCheck.CRITICAL),
        ('probe:ebpf_stats', AgentCheck.WARNING),
    }
    oom = {message for probe, _, message in statuses if probe == 'probe:oom_kill'}
    stats = {message for probe, _, message in statuses if probe == 'probe:ebpf_stats'}
    assert [m.split(':')[0] for m in oom] == ['missing capabilities CAP_BPF, CAP_PERFMON']
    assert [m.split(':')[0] for m in stats] == ['missing capability CAP_SYS_ADMIN']
    assert result['attempts'] == 3  # first run, after 15 s, after 30 more
    assert len(result['warnings']) == 2  # once per probe, not every run
    assert result['tracebacks'] == []


@pytest.mark.oom
def test_with_only_cap_bpf_and_cap_perfmon_oom_kills_work_and_accounting_says_what_it_needs(tmp_path, memory_cgroup):
    conf = tmp_path / 'conf.yaml'
    conf.write_text('instances:\n  - {}\n')
    proc = subprocess.Popen(
        ['setpriv', '--inh-caps=-all', '--bounding-set=-all,+bpf,+perfmon', EBPF_PROBE, 'check', '--json', '-t', '2',
         '--pause', UNTIL_TOLD, '-l', 'info', '-c', str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        read_until(proc.stderr, 'run 1 of 2 finished')
        victim = memory_cgroup.oom_kill(comm='capbpf-victim')
        next_run_now(proc)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    runs = json.loads(stdout)
    statuses = {sc['tags'][0]: (sc['status'], sc['message']) for sc in runs[1]['aggregator']['service_checks']}
    assert statuses['probe:ebpf_stats'][0] == 1  # a WARNING: the install chose not to grant it
    assert statuses['probe:ebpf_stats'][1].startswith('missing capability CAP_SYS_ADMIN')
    if KERNEL is not None and not KERNEL.perfmon_opens_perf_events and perf_event_paranoid() >= 3:
        # Nothing attaches, and the message says why and what to do.
        assert statuses['probe:oom_kill'][0] == 2
        assert 'kernel.perf_event_paranoid is 3' in statuses['probe:oom_kill'][1]
        assert 'grant CAP_SYS_ADMIN, or set kernel.perf_event_paranoid=2' in statuses['probe:oom_kill'][1]
        assert runs[1]['aggregator']['events'] == []
        return
    assert statuses['probe:oom_kill'] == (0, '')
    [event] = runs[1]['aggregator']['events']
    assert event['msg_title'] == f'OOM kill: capbpf-victim (pid {victim.pid})'


def perf_event_paranoid() -> int:
    with open('/proc/sys/kernel/perf_event_paranoid') as f:
        return int(f.read())


# --- Kernel features missing ------------------------------------------------------------------------


@pytest.mark.bcc
def test_no_btf_and_no_headers_is_critical_and_says_what_to_install(dd_run_check, aggregator, monkeypatch):
    monkeypatch.setattr(kernel, 'VMLINUX_BTF', '/nonexistent/btf/vmlinux')
    monkeypatch.setattr(bcc_loader, 'find_kernel_headers', lambda release=None: None)
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    dd_run_check(check)
    [sc] = aggregator.service_checks(CAN_LOAD)
    assert sc.status == AgentCheck.CRITICAL
    assert 'the kernel has no BTF (/nonexistent/btf/vmlinux)' in sc.message
    assert 'CONFIG_DEBUG_INFO_BTF=y' in sc.message
    assert f'install linux-headers-{os.uname().release}' in sc.message


# --- Config -----------------------------------------------------------------------------------------


def test_unknown_options_are_reported(dd_run_check, aggregator, caplog):
    check = EbpfProbeCheck('ebpf_probe', {'colect': 1}, [{'collect_oom_kil': True, 'frobnicate': 3, 'tags': ['a:b']}])
    try:
        dd_run_check(check)
    finally:
        check.cancel()
    assert 'Unknown options in `instances`, ignored: collect_oom_kil, frobnicate' in check.warnings[0]
    assert 'Unknown option in `init_config`, ignored: colect' in check.warnings[1]


# --- Hostile input ----------------------------------------------------------------------------------


@pytest.mark.oom
def test_a_real_oom_kill_of_a_process_with_a_hostile_name(dd_run_check, aggregator):
    hostile_comm = b'\xff,|#: \n%%%*x'  # not UTF-8, separators, newline, markdown; 12 bytes
    cgroup = MemoryCgroup(prefix='odd name,|#:%')
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    try:
        dd_run_check(check)
        victim = cgroup.oom_kill(comm=hostile_comm)
        aggregator.reset()
        dd_run_check(check)
    finally:
        check.cancel()
        cgroup.remove()
    [event] = aggregator.events
    for tag in event['tags']:
        key, _, value = tag.partition(':')
        assert not UNSAFE_TAG.search(tag) and value and len(tag) <= 200, tag
    assert 'process_name:\\xff_:_%%%*x' in event['tags']
    assert f'cgroup_name:odd_name_:%-{cgroup.name.rsplit("-", 1)[1]}' in event['tags']
    assert event['msg_title'] == f'OOM kill: \\xff,|#: \\x0a%%%*x (pid {victim.pid})'
    text = event['msg_text']
    assert '**\\\\xff,\\|\\#: \\\\x0a\\%\\%\\%\\*x**' in text
    lines = text.split('\n')
    assert lines[0] == lines[-1] == '%%%'
    assert all(line.endswith('|') for line in lines if line.startswith('|'))
    aggregator.assert_metric('ebpf_probe.oom_kill.count', value=1, count=1)


# --- Bursts and overflow ----------------------------------------------------------------------------


@pytest.mark.oom
@pytest.mark.slow
def test_kills_beyond_the_buffer_are_counted_and_the_rest_reported_once(dd_run_check, aggregator, memory_cgroup):
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False, 'max_buffered_oom_kills': 1}])
    # A ring buffer of one page holds as many records as fit with their 8-byte headers, 8-aligned.
    held = resource.getpagesize() // ((RING_SAMPLE_SIZE + 7) // 8 * 8)
    try:
        dd_run_check(check)
        victims = [memory_cgroup.oom_kill(comm=f'overflow-{i}') for i in range(held + 2)]
        aggregator.reset()
        dd_run_check(check)
        titles = [e['msg_title'] for e in aggregator.events]
        [dropped] = [m.value for m in aggregator.metrics('ebpf_probe.oom_kill.dropped')]
        if kernels.offers_ring_buffer():
            assert titles == [f'OOM kill: overflow-{i} (pid {v.pid})' for i, v in enumerate(victims[:held])]
            assert dropped == 2
        else:  # per-CPU perf buffers: how many each holds depends on where the kills ran
            assert len(titles) + dropped == len(victims)
        aggregator.assert_metric('ebpf_probe.oom_kill.unaccounted', value=0, count=1)  # dropped is accounted for
        aggregator.reset()
        dd_run_check(check)
        assert aggregator.events == []
        aggregator.assert_metric('ebpf_probe.oom_kill.dropped', value=0, count=1)
    finally:
        check.cancel()


# --- Concurrency ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cancel_from_another_thread_during_runs():
    loads = []
    loader = check_module.load_oom_kill_probe

    def counting_loader(*args):
        loads.append(1)
        return loader(*args)

    check_module.load_oom_kill_probe = counting_loader
    before, fds = settled_objects(), open_fds()
    check = EbpfProbeCheck('ebpf_probe', {}, [{}])
    stop = threading.Event()
    cancels = []

    def canceller():
        while not stop.is_set():
            check.cancel()
            cancels.append(1)
            time.sleep(0.002)

    thread = threading.Thread(target=canceller)
    try:
        thread.start()
        errors = [check.run() for _ in range(60)]
    finally:
        stop.set()
        thread.join()
        check_module.load_oom_kill_probe = loader
    assert errors == [''] * 60
    assert len(cancels) > 60 and len(loads) > 1  # cancelled for real, and loaded again after
    check.cancel()
    assert check._oom_kill.probe is None and check._ebpf_stats.probe is None
    assert wait_for_objects(before) == before
    assert open_fds() == fds
    assert check.run() == ''  # a later run loads cleanly
    assert check._oom_kill.probe is not None
    check.cancel()
    stub_aggregator.reset()


@pytest.mark.oom
def test_a_name_cut_by_the_kernel_inside_a_utf8_character(dd_run_check, aggregator, memory_cgroup):
    # 9 two-byte characters: the kernel keeps 15 bytes, half of the 8th character.
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_ebpf_stats': False}])
    try:
        dd_run_check(check)
        victim = memory_cgroup.oom_kill(comm='ééééééééé')
        aggregator.reset()
        dd_run_check(check)
    finally:
        check.cancel()
    [event] = aggregator.events
    assert event['msg_title'] == f'OOM kill: ééééééé\\xc3 (pid {victim.pid})'
    assert 'process_name:ééééééé\\xc3' in event['tags']
