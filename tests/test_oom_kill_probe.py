# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The OOM-kill probe against the real kernel: real OOM kills in memory cgroups of their own,
compared with the kernel's own report of them."""

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest

from datadog_checks.ebpf_probe.kernel import bcc as kernel_bcc
from datadog_checks.ebpf_probe.kernel import features, libbpf
from datadog_checks.ebpf_probe.kernel.bcc import BccProgram
from datadog_checks.ebpf_probe.kernel.btf import Btf
from datadog_checks.ebpf_probe.lifecycle import ProbeLoadError
from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, core, hooks, load_oom_kill_probe
from datadog_checks.ebpf_probe.oom_kill.bcc import BCC_SOURCE, bcc_offsets
from datadog_checks.ebpf_probe.oom_kill.core import CORE_OBJECT
from datadog_checks.ebpf_probe.oom_kill.probe import PERF_SAMPLE_SIZE, RING_SAMPLE_SIZE
from datadog_checks.ebpf_probe.oom_kill.record import RECORD, RECORD_FIELDS
from datadog_checks.ebpf_probe.resources import bpf_file

from . import kernels
from .bpf_objects import bpftool_struct
from .cgroups import MemoryCgroup
from .kernel_report import KernelLog, KernelOomReport
from .processes import read_until

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
CORE_ONLY = OOMKillProbeOptions(enable_core=True, allow_runtime_compiled_fallback=False)
BCC_ONLY = OOMKillProbeOptions(enable_core=False, allow_runtime_compiled_fallback=True)
KERNEL = kernels.current()
PAGE_SIZE = __import__('resource').getpagesize()
# What a thread may keep of its anonymous RSS before 6.2: it hands its changes over when a fault
# starts after more than 64 (TASK_RSS_EVENTS_THRESH), one page each.
RSS_THREAD_CACHE_PAGES = 65
RSS_THREAD_CACHE_KB = RSS_THREAD_CACHE_PAGES * PAGE_SIZE // 1024


def program_ids(name: str) -> set[int]:
    progs = json.loads(subprocess.run(['bpftool', '-j', 'prog', 'show'], capture_output=True, check=True).stdout)
    return {p['id'] for p in progs if p.get('name') == name}


def still_loaded(name: str, ids: set[int], timeout: float = 10.0) -> set[int]:
    """The kernel frees programs shortly after their last fd closes: wait rather than flake."""
    deadline = time.monotonic() + timeout
    while (left := ids & program_ids(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def assert_hooks(probe, variant: str) -> None:
    if KERNEL is not None:
        assert tuple(probe.hooks) == (KERNEL.core_hooks if variant == 'co-re' else KERNEL.bcc_hooks)
    else:
        assert probe.hooks and set(probe.hooks) <= {h.name for h in hooks.HOOKS}


def assert_equals_the_kernel_report(kill, report: KernelOomReport, cgroup: MemoryCgroup) -> None:
    """Every field the kernel printed, equal; the cgroup id is the directory's inode."""
    assert kill.victim_pid == report.pid
    assert kill.victim_comm == report.comm
    assert kill.victim_uid == report.uid
    assert kill.oom_score_adj == report.oom_score_adj
    assert kill.trigger_comm == report.trigger_comm
    assert kill.memory is not None
    assert (
        kill.memory.total_vm_kb,
        kill.memory.anon_rss_kb,
        kill.memory.file_rss_kb,
        kill.memory.shmem_rss_kb,
        kill.memory.pgtables_kb,
    ) == (report.total_vm_kb, report.anon_rss_kb, report.file_rss_kb, report.shmem_rss_kb, report.pgtables_kb)
    assert report.constraint == 'CONSTRAINT_MEMCG' and kill.memcg_oom is True and kill.trigger_type == 'cgroup'
    assert kill.cgroup_path == report.task_memcg == cgroup.path
    assert kill.cgroup_id == cgroup.inode
    assert kill.cgroup_path_truncated is False


@pytest.mark.oom
@pytest.mark.parametrize(
    'options, variant',
    [pytest.param(CORE_ONLY, 'co-re', id='co-re'), pytest.param(BCC_ONLY, 'bcc', id='bcc', marks=pytest.mark.bcc)],
)
def test_a_real_oom_kill_is_recorded_once_as_the_kernel_reports_it(memory_cgroup, options, variant):
    probe = load_oom_kill_probe(options, log)
    try:
        assert probe.variant == variant
        assert_hooks(probe, variant)
        probe.get_and_flush()  # whatever happened on the host before this test

        with KernelLog(full=True) as kernel_log:
            victim = memory_cgroup.oom_kill(comm='oomtest-victim', oom_score_adj=42)
        result = probe.get_and_flush()

        [report] = kernel_log.oom_reports()
        assert result.dropped == 0
        [kill] = result.kills
        assert_equals_the_kernel_report(kill, report, memory_cgroup)
        assert kill.victim_pid == victim.pid and kill.victim_tid == victim.pid
        assert kill.trigger_pid == victim.pid  # it overflowed its own cgroup: it triggered its own kill
        assert victim.started - 1 <= kill.timestamp <= victim.ended + 1
        assert kill.hook == probe.hooks[0]
        if hooks.KPROBE.name in probe.hooks:
            # oom_control, through the kprobe: the domain is the cgroup's limit (no swap here).
            assert kill.oom_domain_pages == report.limit_kb * 1024 // PAGE_SIZE
            assert kill.badness_points is not None and kill.badness_points > 0
        else:
            assert kill.oom_domain_pages is None and kill.badness_points is None

        assert probe.get_and_flush().kills == []  # none returned twice
    finally:
        probe.close()
    probe.close()  # idempotent


@pytest.mark.oom
@pytest.mark.parametrize(
    'options, variant',
    [pytest.param(CORE_ONLY, 'co-re', id='co-re'), pytest.param(BCC_ONLY, 'bcc', id='bcc', marks=pytest.mark.bcc)],
)
def test_the_perf_buffer_path_reports_each_kill_once(memory_cgroup, options, variant, monkeypatch):
    """Kernels before 5.8 have no ring buffer: the same kills through a perf buffer."""
    monkeypatch.setattr(features, 'has_ring_buffer', lambda: False)  # as such a kernel
    probe = load_oom_kill_probe(options, log)
    try:
        assert probe.variant == variant
        probe.get_and_flush()
        with KernelLog(full=True) as kernel_log:
            victims = [memory_cgroup.oom_kill(comm=f'perf-{i}') for i in range(2)]
        result = probe.get_and_flush()
        assert result.dropped == 0
        assert [k.victim_pid for k in result.kills] == [v.pid for v in victims]
        for kill, report in zip(result.kills, kernel_log.oom_reports(), strict=True):
            assert_equals_the_kernel_report(kill, report, memory_cgroup)
        assert probe.get_and_flush().kills == []
    finally:
        probe.close()


@pytest.mark.oom
@pytest.mark.slow
@pytest.mark.parametrize(
    'options, sample_size',
    [
        (CORE_ONLY, RING_SAMPLE_SIZE),
        (CORE_ONLY, PERF_SAMPLE_SIZE),
        pytest.param(BCC_ONLY, PERF_SAMPLE_SIZE, marks=pytest.mark.bcc),
    ],
    ids=['co-re-ring', 'co-re-perf', 'bcc-perf'],
)
def test_kills_beyond_the_buffer_are_counted_as_dropped_exactly(memory_cgroup, options, sample_size, monkeypatch):
    if sample_size == PERF_SAMPLE_SIZE:
        monkeypatch.setattr(features, 'has_ring_buffer', lambda: False)  # as a kernel before 5.8
    # One page holds this many records; the victims run on one CPU, so one perf buffer takes them all.
    fits = PAGE_SIZE // sample_size
    probe = load_oom_kill_probe(OOMKillProbeOptions(**{**options.__dict__, 'max_buffered_kills': 1}), log)
    try:
        probe.get_and_flush()
        victims = [memory_cgroup.oom_kill(comm=f'burst-{i}', cpu=0) for i in range(fits + 2)]
        result = probe.get_and_flush()
        assert [k.victim_pid for k in result.kills] == [v.pid for v in victims[:fits]]
        assert result.dropped == 2
        again = probe.get_and_flush()
        assert again.kills == [] and again.dropped == 0  # a drop is reported once
    finally:
        probe.close()


@pytest.mark.bcc
def test_bcc_picks_the_ring_buffer_by_what_the_kernel_offers_not_its_version(monkeypatch):
    from datadog_checks.ebpf_probe.kernel import requirements

    monkeypatch.setattr(requirements, 'kernel_version', lambda release=None: (5, 4, 0))  # a version before 5.8
    monkeypatch.setattr(requirements, 'raise_memlock_limit', lambda needed, version=None: None)  # not what this is
    probe = load_oom_kill_probe(BCC_ONLY, log)
    try:
        assert probe._program._is_ring is kernels.offers_ring_buffer()
    finally:
        probe.close()
    monkeypatch.setattr(features, 'has_ring_buffer', lambda: False)
    probe = load_oom_kill_probe(BCC_ONLY, log)
    try:
        assert probe._program._is_ring is False
    finally:
        probe.close()


@pytest.mark.oom
def test_classic_tracepoint_names_the_thread_and_the_process_only_when_known(memory_cgroup, monkeypatch):
    # The last resort, where neither the task hook nor a kprobe can be had.
    monkeypatch.setattr(hooks, 'WITHHELD', frozenset({hooks.TP_BTF.name, hooks.KILL_KPROBE.name, hooks.KPROBE.name}))
    options = OOMKillProbeOptions(allow_runtime_compiled_fallback=False, mount_tracefs=True)
    probe = load_oom_kill_probe(options, log)
    try:
        assert probe.hooks == [hooks.TRACEPOINT.name]
        probe.get_and_flush()
        with KernelLog() as kernel_log:
            # A process killed for the allocation of one of its threads: its main thread is marked.
            self_killed = memory_cgroup.oom_kill(comm='oomtest-tp', oom_score_adj=7, mode='thread')
            # A bystander killed for another process's allocation: only its thread id is known.
            bystander = memory_cgroup.start('bystander', oom_score_adj=1000, alloc_mb=20, mode='hold')
            assert bystander.stdout.readline() == b'ready\n'
            # Too much beside the bystander (charged from joining the cgroup on), room once it is gone.
            allocator = memory_cgroup.start('allocator', alloc_mb=16)
            allocator.wait(timeout=60)
            bystander.wait(timeout=60)
        kills = probe.get_and_flush().kills
        reports = kernel_log.oom_reports()
        # The kernel may kill the allocator too, before the bystander's memory is uncharged.
        assert [r.pid for r in reports] in ([self_killed.pid, bystander.pid],
                                            [self_killed.pid, bystander.pid, allocator.pid])  # fmt: skip
        assert [k.victim_tid for k in kills] == [r.pid for r in reports]
        mine, other = kills[:2]

        assert (mine.victim_pid, mine.victim_tid) == (self_killed.pid, self_killed.pid)
        assert mine.trigger_pid == self_killed.pid and mine.trigger_tid != self_killed.pid  # the second thread
        assert mine.memcg_oom is True  # from the trigger's kernel stack
        assert mine.cgroup_path is None  # the tracepoint gives no task: no cgroup
        if kernels.mark_victim_passes_the_task():
            assert mine.victim_comm == 'oomtest-tp' and mine.oom_score_adj == 7
            assert mine.memory is not None
            if KERNEL is not None and not KERNEL.rss_cached_per_thread:
                assert mine.memory.anon_rss_kb == reports[0].anon_rss_kb
            else:  # the main thread, killed, may hand over its cached RSS between the tracepoint and the print
                assert abs(mine.memory.anon_rss_kb - reports[0].anon_rss_kb) <= RSS_THREAD_CACHE_KB

        assert other.victim_pid is None and other.victim_tid == bystander.pid
        assert other.trigger_pid == allocator.pid
        if len(reports) == 3:
            assert (kills[2].victim_pid, kills[2].trigger_pid) == (allocator.pid, allocator.pid)
            assert allocator.returncode == -signal.SIGKILL
        else:
            assert allocator.returncode == 3  # it went on once the bystander was gone
    finally:
        probe.close()


@pytest.mark.oom
@pytest.mark.parametrize('length', [127, 128, 200])
def test_a_long_cgroup_name_is_marked_truncated_only_when_it_is(length):
    name = (f'long-{length}-{uuid.uuid4().hex}' + 'x' * length)[:length]
    cgroup = MemoryCgroup(name=name)
    probe = load_oom_kill_probe(CORE_ONLY, log)
    try:
        probe.get_and_flush()
        cgroup.oom_kill(comm='long-name')
        [kill] = probe.get_and_flush().kills
        assert kill.cgroup_id == cgroup.inode
        assert kill.cgroup_path == '/' + name[:127]
        assert kill.cgroup_path_truncated is (length > 127)
    finally:
        probe.close()
        cgroup.remove()


@pytest.mark.oom
def test_a_cgroup_deeper_than_kept_levels_shows_the_leaf_levels_after_an_ellipsis():
    levels = tuple(f'ebpf-probe-deep-{uuid.uuid4().hex[:6]}' if i == 0 else f'l{i}' for i in range(9))
    cgroup = MemoryCgroup(below=levels)  # 10 levels in all
    probe = load_oom_kill_probe(CORE_ONLY, log)
    try:
        probe.get_and_flush()
        cgroup.oom_kill(comm='deep')
        [kill] = probe.get_and_flush().kills
        kept = (*levels, cgroup.name)[-8:]
        assert kill.cgroup_path == '/.../' + '/'.join(kept)
        assert kill.cgroup_path_truncated is True
        assert kill.cgroup_name == cgroup.name
        assert kill.cgroup_id == cgroup.inode
    finally:
        probe.close()
        cgroup.remove()


def test_probe_close_detaches_and_frees_everything():
    others = {hook.program[:15]: program_ids(hook.program[:15]) for hook in hooks.HOOKS}  # other probes' (as cut)
    probe = load_oom_kill_probe(CORE_ONLY, log)
    [hook] = [hook for hook in hooks.HOOKS if hook.name == probe.hooks[0]]
    program = hook.program[:15]
    ours = program_ids(program) - others[program]
    assert ours
    probe.close()
    assert still_loaded(program, ours) == set()


def record_offsets() -> dict[str, int]:
    """Byte offset of each field of RECORD, as the decoder lays them out."""
    offsets, layout = {}, '<'
    for name, field_layout in RECORD_FIELDS:
        offsets[name] = struct.calcsize(layout)
        layout += field_layout
    return offsets


def test_record_layout_matches_the_compiled_object_field_by_field():
    obj = libbpf.BpfObject(str(bpf_file(CORE_OBJECT)))
    try:
        btf = Btf.of_object(obj)
        record = btf.find('oom_kill_record', 4)
        assert btf.size(record) == RECORD.size
        in_btf = {name: offset_bits // 8 for name, _type, offset_bits in btf.members(record)}
        assert in_btf == record_offsets()
    finally:
        obj.close()


def test_the_kprobe_program_passes_the_verifier_and_attaches_where_the_kernel_has_kprobes():
    obj = libbpf.BpfObject(str(bpf_file(CORE_OBJECT)))
    try:
        obj.set_autoload(hooks.TP_BTF.program, False)
        obj.set_autoload(hooks.TRACEPOINT.program, False)
        obj.load()  # runs the verifier on the kprobe program
        assert libbpf.prog_info(obj.program_fd(hooks.KPROBE.program)).type == 2  # BPF_PROG_TYPE_KPROBE
        has_kprobes = kernels.has_kprobes()
        if has_kprobes is None:  # the kernel does not tell: attaching must agree with what the probe says
            has_kprobes = features.kprobe_support()[0]
        if has_kprobes:
            assert obj.attach(hooks.KPROBE.program).fd > 0
        else:
            with pytest.raises(libbpf.LibbpfError) as error:
                obj.attach(hooks.KPROBE.program)
            assert 'bpf_program__attach(oom_kill_process) failed' in str(error.value)
    finally:
        obj.close()


def test_a_kernel_without_kprobes_is_said_so():
    supported, reason = features.kprobe_support()
    if kernels.has_kprobes() is not None:
        assert supported is kernels.has_kprobes()
    probe = load_oom_kill_probe(CORE_ONLY, log)
    try:
        if supported:
            assert hooks.KPROBE.name in probe.hooks
        else:
            assert 'CONFIG_KPROBES' in reason
            assert probe.rejected_hooks[hooks.KPROBE.name] == reason
    finally:
        probe.close()


def test_the_task_hook_is_chosen_from_btf_not_the_version_number():
    with Btf.open() as btf:
        by_fields = hooks.task_hook_in_btf(btf)
        assert by_fields == hooks.mark_victim_passes_task(btf)  # the tracepoint's fields and its prototype agree
    if KERNEL is not None:
        assert by_fields[0] is KERNEL.task_tracepoint


@pytest.mark.bcc
def test_bcc_kprobe_variant_compiles_and_loads():
    with Btf.open() as btf:
        defines = bcc_offsets(btf)
    defines.update(PAGE_SIZE_KB='4', USE_RINGBUF='1', RINGBUF_PAGES='16', HOOK_KPROBE='1', KPROBE_WRITES_RECORDS='1')
    program = BccProgram.compile(bpf_file(BCC_SOURCE), defines)
    try:
        bpf = program._bpf
        assert bpf.load_func(hooks.BCC_FUNCTIONS[hooks.KPROBE.name].encode(), bpf.KPROBE).fd > 0
    finally:
        program.close()


@pytest.mark.bcc
def test_bcc_variant_compiles_with_offsets_from_kernel_headers():
    """Without BTF, offsets come from the kernel headers BCC compiles with. Here those are
    Debian's 6.1 headers, not this kernel's, so only compiling and loading can be checked;
    the 5.10 VM row runs this path for real (test_without_btf_bcc_compiles_against_...)."""
    defines = bcc_offsets(None)
    assert defines == {'OFFSETS_FROM_HEADERS': '1'}
    defines.update(PAGE_SIZE_KB='4', USE_RINGBUF='1', RINGBUF_PAGES='16', HOOK_RAW_TP='1', HOOK_KPROBE='1')
    program = BccProgram.compile(bpf_file(BCC_SOURCE), defines)
    try:
        bpf = program._bpf
        assert bpf.load_func(hooks.RAW_TP.program.encode(), bpf.RAW_TRACEPOINT).fd > 0
        assert bpf.load_func(hooks.BCC_FUNCTIONS[hooks.KPROBE.name].encode(), bpf.KPROBE).fd > 0
    finally:
        program.close()


def bpftool_member_offsets(struct_name: str) -> dict[str, int]:
    return dict(bpftool_struct(struct_name))


@pytest.mark.bcc
def test_bcc_offsets_from_btf_are_what_bpftool_reads():
    with Btf.open() as btf:
        defines = bcc_offsets(btf)
    task = bpftool_member_offsets('task_struct')
    for macro, member in (('OFF_TASK_PID', 'pid'), ('OFF_TASK_TGID', 'tgid'), ('OFF_TASK_MM', 'mm'),
                          ('OFF_TASK_SIGNAL', 'signal'), ('OFF_TASK_REAL_CRED', 'real_cred')):  # fmt: skip
        assert int(defines[macro]) == task[member], macro
    kernfs = bpftool_member_offsets('kernfs_node')
    assert int(defines['OFF_KN_PARENT']) == kernfs.get('__parent', kernfs.get('parent'))
    signal = bpftool_member_offsets('signal_struct')
    pending = bpftool_member_offsets('sigpending')
    assert int(defines['OFF_SIGNAL_PENDING']) == signal['shared_pending'] + pending['signal']
    oc = bpftool_member_offsets('oom_control')
    assert int(defines['OFF_OC_CHOSEN_POINTS']) == oc['chosen_points']


# The probe in a process of its own, in a mount namespace where the kernel's BTF is an empty file.
HIDDEN_BTF = 'mount --bind /dev/null /sys/kernel/btf/vmlinux && exec "$@"'
PROBE_PROCESS = """
import dataclasses, json, logging, sys
from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe
probe = load_oom_kill_probe(OOMKillProbeOptions(), logging.getLogger('probe'))
print(json.dumps({'variant': probe.variant, 'hooks': probe.hooks, 'limitations': probe.limitations}), flush=True)
sys.stdin.readline()
kills = probe.get_and_flush().kills
print(json.dumps([{**dataclasses.asdict(k), 'trigger_type': k.trigger_type} for k in kills]), flush=True)
probe.close()
"""


@pytest.mark.oom
@pytest.mark.bcc
@pytest.mark.kernel_headers
def test_without_btf_bcc_compiles_against_this_kernels_headers_and_reports_a_kill_as_the_kernel_does(memory_cgroup):
    """The fallback for real (the 5.10 row): CO-RE fails for want of BTF, BCC takes the struct
    layout from the running kernel's own headers, and the kill matches the kernel's report."""
    release = os.uname().release
    assert kernel_bcc.find_kernel_headers() == f'/lib/modules/{release}/build'  # this kernel's, not others'
    proc = subprocess.Popen(
        ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', HIDDEN_BTF, 'sh', sys.executable, '-c',
         PROBE_PROCESS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        loaded = json.loads(read_until(proc.stdout, '{').splitlines()[-1])
        assert loaded['variant'] == 'bcc'
        [fallback] = loaded['limitations']
        assert fallback.startswith('it runs on the BCC fallback: CO-RE failed: ') and 'BTF' in fallback
        if KERNEL is not None:
            assert tuple(loaded['hooks']) == KERNEL.bcc_hooks
        with KernelLog(full=True) as kernel_log:
            memory_cgroup.oom_kill(comm='headers-victim', oom_score_adj=42)
        proc.stdin.write('\n')
        proc.stdin.flush()
        kills, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    [report] = kernel_log.oom_reports()
    [kill] = json.loads(kills)
    kill = SimpleNamespace(**{**kill, 'memory': SimpleNamespace(**kill['memory'])})
    assert_equals_the_kernel_report(kill, report, memory_cgroup)


# The probe loaded in a mount namespace of its own where tracefs is not mounted (nor debugfs, whose
# tracing folder would mount it on access), three ways; what it loaded or why not, and the mounts after.
NO_TRACEFS = ('umount -q /sys/kernel/tracing; umount -q /sys/kernel/debug/tracing; umount -q -l /sys/kernel/debug; '
              'exec "$@"')  # fmt: skip
WITHOUT_TRACEFS = """
import json, logging
from datadog_checks.ebpf_probe.kernel import features
from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, hooks, load_oom_kill_probe
classic_only = frozenset(h.name for h in (hooks.TP_BTF, hooks.KPROBE, hooks.KILL_KPROBE))
results = {'tracefs_before': features.tracefs_path()}
for name, withheld, mount in [('default', frozenset(), False), ('classic', classic_only, False),
                              ('classic-mount', classic_only, True)]:
    hooks.WITHHELD = withheld  # the tests' seam: these hooks are left out
    try:
        options = OOMKillProbeOptions(allow_runtime_compiled_fallback=False, mount_tracefs=mount)
        probe = load_oom_kill_probe(options, logging.getLogger('probe'))
        results[name] = {'hooks': probe.hooks}
        probe.close()
    except Exception as e:
        results[name] = {'error': str(e)}
    results[name]['tracefs'] = features.tracefs_path()
print(json.dumps(results))
"""


def test_tracefs_is_mounted_only_when_the_option_asks_and_a_hook_needs_it():
    """mount_tracefs is off by default: a missing tracefs costs only the classic tracepoint, and the
    error says what to mount; asked to, the probe mounts it and the tracepoint works."""
    result = subprocess.run(
        ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', NO_TRACEFS, 'sh', sys.executable, '-c',
         WITHOUT_TRACEFS], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded['tracefs_before'] is None
    # The task hook or a kprobe needs no tracefs; every kernel of the table offers one of them.
    default = loaded['default']
    if 'error' in default:
        assert KERNEL is None and 'mount -t tracefs' in default['error'], default
    else:
        assert hooks.TRACEPOINT.name not in default['hooks'], default
    assert default['tracefs'] is None
    classic = loaded['classic']
    assert 'mount -t tracefs tracefs /sys/kernel/tracing' in classic['error']
    assert 'mount_tracefs: true' in classic['error']
    assert classic['tracefs'] is None  # nothing mounted
    assert loaded['classic-mount'] == {'hooks': [hooks.TRACEPOINT.name], 'tracefs': '/sys/kernel/tracing'}


class TestFallback:
    @pytest.fixture
    def corrupt_object(self, tmp_path, monkeypatch):
        """A CO-RE object that libbpf cannot open, in the place of the real one."""
        path = tmp_path / 'corrupt.bpf.o'
        path.write_bytes(b'\x7fELF' + b'\0' * 60)
        monkeypatch.setattr(core, 'core_object', lambda: path)

    @pytest.mark.bcc
    @pytest.mark.usefixtures('corrupt_object')
    def test_core_failure_falls_back_to_bcc_with_a_warning(self, caplog):
        options = OOMKillProbeOptions()
        with caplog.at_level(logging.WARNING):
            probe = load_oom_kill_probe(options, log)
        try:
            assert probe.variant == 'bcc'
            [fallback] = probe.limitations
            assert fallback.startswith(
                'it runs on the BCC fallback: CO-RE failed: bpf_object__open_file(corrupt.bpf.o) failed'
            )
            [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert 'CO-RE load of the OOM kill probe failed' in warning.getMessage()
            assert 'bpf_object__open_file' in warning.getMessage()
        finally:
            probe.close()

    @pytest.mark.usefixtures('corrupt_object')
    def test_core_failure_without_fallback_says_how_to_enable_it(self):
        options = OOMKillProbeOptions(allow_runtime_compiled_fallback=False)
        with pytest.raises(ProbeLoadError) as error:
            load_oom_kill_probe(options, log)
        message = str(error.value)
        assert message.startswith('CO-RE load failed: bpf_object__open_file(corrupt.bpf.o) failed')
        assert 'allow_runtime_compiled_fallback: true' in message

    @pytest.mark.bcc
    @pytest.mark.usefixtures('corrupt_object')
    def test_both_failing_is_one_error_with_both_causes(self, monkeypatch):
        monkeypatch.setattr(kernel_bcc, 'find_kernel_headers', lambda release=None: None)
        options = OOMKillProbeOptions()
        with pytest.raises(ProbeLoadError) as error:
            load_oom_kill_probe(options, log)
        message = str(error.value)
        assert 'CO-RE load failed: bpf_object__open_file(corrupt.bpf.o)' in message
        assert 'BCC runtime compilation failed too: no kernel headers for' in message

    def test_missing_btf_file_is_named(self):
        options = OOMKillProbeOptions(btf_path='/nonexistent/vmlinux.btf', allow_runtime_compiled_fallback=False)
        with pytest.raises(ProbeLoadError, match='btf_path /nonexistent/vmlinux.btf does not exist'):
            load_oom_kill_probe(options, log)

    def test_corrupt_btf_fails_core_and_names_libbpf_error(self, tmp_path):
        btf = tmp_path / 'vmlinux.btf'
        btf.write_bytes(b'\x9f\xeb\x01\x00' + b'\xff' * 40)
        options = OOMKillProbeOptions(btf_path=str(btf), allow_runtime_compiled_fallback=False)
        with pytest.raises(ProbeLoadError, match='CO-RE load failed: .*failed'):
            load_oom_kill_probe(options, log)

    def test_nothing_enabled_is_refused(self):
        with pytest.raises(ProbeLoadError, match='enable_core and allow_runtime_compiled_fallback are both false'):
            load_oom_kill_probe(OOMKillProbeOptions(enable_core=False, allow_runtime_compiled_fallback=False), log)


@pytest.mark.bcc
@pytest.mark.oom
def test_bcc_a_kprobe_that_does_not_attach_gives_way_to_the_tracepoint(memory_cgroup, monkeypatch):
    """As the CO-RE variant does, where the kprobe was to be the only hook besides the tracepoint."""
    from datadog_checks.ebpf_probe.kernel.bcc import BccError, BccProgram

    attach_kprobe = BccProgram.attach_kprobe

    def refused(self, event, function):
        if event == 'oom_kill_process':  # as a kernel that will not let it attach (blacklisted, say)
            raise BccError('attaching the kprobe oom_kill_process failed: refused by the test')
        return attach_kprobe(self, event, function)

    monkeypatch.setattr(BccProgram, 'attach_kprobe', refused)
    monkeypatch.setattr(hooks, 'WITHHELD', frozenset({hooks.RAW_TP.name, hooks.KILL_KPROBE.name}))
    options = OOMKillProbeOptions(enable_core=False, mount_tracefs=True)
    probe = load_oom_kill_probe(options, log)
    try:
        assert probe.hooks == [hooks.TRACEPOINT.name]
        if kernels.has_kprobes() is not False:  # it was planned, refused, and said
            assert probe.rejected_hooks[hooks.KPROBE.name].endswith('refused by the test')
        probe.get_and_flush()
        with KernelLog() as kernel_log:
            victim = memory_cgroup.oom_kill(comm='bcc-tp-victim')
        [kill] = probe.get_and_flush().kills
        [report] = kernel_log.oom_reports()
        assert kill.victim_tid == victim.pid == report.pid and kill.hook == hooks.TRACEPOINT.name
    finally:
        probe.close()


@pytest.mark.bcc
def test_bcc_a_program_that_does_not_compile_says_why_and_leaves_the_processs_stderr_alone(tmp_path, capfd):
    """BCC's C++ side writes the compiler's messages to fd 2, which every thread of the Agent's process
    shares: the check never redirects it (it would take the other threads' output too), nor hides them."""
    source = tmp_path / 'broken.c'
    source.write_text('int broken(void *ctx) { return undeclared_thing; }\n')
    real_dup2 = os.dup2

    def dup2(fd, fd2, *args):
        assert fd2 != 2, 'fd 2 redirected'
        return real_dup2(fd, fd2, *args)

    capfd.readouterr()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(kernel_bcc.BccError) as error:
        patch.setattr(os, 'dup2', dup2)
        BccProgram.compile(source, {})
    assert "messages are on the process's standard error" in str(error.value)
    assert "use of undeclared identifier 'undeclared_thing'" in capfd.readouterr().err
