# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The OOM-kill probe against the real kernel: real OOM kills in memory cgroups of their own."""

import json
import logging
import subprocess
import time

import pytest

from datadog_checks.ebpf_probe import bcc_loader, kernel, libbpf
from datadog_checks.ebpf_probe.bcc_loader import BccProgram, bcc_offsets
from datadog_checks.ebpf_probe.oom_kill import (
    BCC_SOURCE,
    CORE_OBJECT,
    RECORD,
    OOMKillProbeOptions,
    ProbeLoadError,
    load_oom_kill_probe,
)
from datadog_checks.ebpf_probe.resources import bpf_file

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
CORE_ONLY = OOMKillProbeOptions(enable_core=True, allow_runtime_compiled_fallback=False)
BCC_ONLY = OOMKillProbeOptions(enable_core=False, allow_runtime_compiled_fallback=True)
KPROBE = 'kprobe/oom_kill_process'


def our_program_ids(name: str) -> set[int]:
    progs = json.loads(subprocess.run(['bpftool', '-j', 'prog', 'show'], capture_output=True, check=True).stdout)
    return {p['id'] for p in progs if p.get('name') == name}


def wait_until_gone(name: str, timeout: float = 10.0) -> set[int]:
    """The kernel frees programs shortly after their last fd closes: wait rather than flake."""
    deadline = time.monotonic() + timeout
    while (ids := our_program_ids(name)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return ids


def assert_is_the_kill(kill, victim, memory_cgroup, comm, adj):
    assert kill.victim_pid == victim.pid
    assert kill.victim_tid == victim.pid
    assert kill.victim_comm == comm
    assert kill.oom_score_adj == adj
    assert kill.victim_uid == 0
    # The victim overflowed its own cgroup: it triggered its own kill.
    assert kill.trigger_pid == victim.pid
    assert kill.trigger_comm == comm
    assert kill.memcg_oom is True
    assert kill.trigger_type == 'cgroup'
    assert kill.sigkill is True
    assert victim.started - 1 <= kill.timestamp <= victim.ended + 1


@pytest.mark.oom
@pytest.mark.parametrize(
    'options, variant, hook',
    [(CORE_ONLY, 'co-re', 'tp_btf/mark_victim'), (BCC_ONLY, 'bcc', 'raw_tracepoint/mark_victim')],
    ids=['co-re', 'bcc'],
)
def test_probe_records_a_real_oom_kill_once(memory_cgroup, options, variant, hook):
    probe = load_oom_kill_probe(options, log)
    try:
        assert probe.variant == variant
        assert probe.hooks == [hook]
        probe.get_and_flush()  # whatever happened on the host before this test

        victim = memory_cgroup.oom_kill(comm='oomtest-victim', oom_score_adj=42)
        result = probe.get_and_flush()

        assert result.dropped == 0
        assert len(result.kills) == 1
        kill = result.kills[0]
        assert_is_the_kill(kill, victim, memory_cgroup, 'oomtest-victim', 42)
        assert kill.hook == hook
        assert kill.cgroup_path == memory_cgroup.path
        assert kill.cgroup_name == memory_cgroup.name
        assert kill.cgroup_id and kill.cgroup_path_truncated is False
        # The victim filled its 32 MB limit with anonymous memory (its RSS also holds what the
        # interpreter allocated before joining the cgroup, which the cgroup was not charged for).
        assert kill.memory is not None
        assert 16 * 1024 < kill.memory.anon_rss_kb < 64 * 1024
        assert kill.memory.total_vm_kb > kill.memory.rss_kb > 0
        assert kill.memory.pgtables_kb > 0
        # Neither hook here sees oom_control (that needs the kprobe).
        assert kill.oom_domain_pages is None and kill.badness_points is None

        assert probe.get_and_flush().kills == []  # none returned twice
    finally:
        probe.close()
    probe.close()  # idempotent


@pytest.mark.oom
def test_classic_tracepoint_hook_reports_what_its_fields_hold(memory_cgroup):
    options = OOMKillProbeOptions(
        allow_runtime_compiled_fallback=False, disabled_hooks=frozenset({'tp_btf/mark_victim'})
    )
    probe = load_oom_kill_probe(options, log)
    try:
        assert probe.hooks == ['tracepoint/oom/mark_victim']
        probe.get_and_flush()
        victim = memory_cgroup.oom_kill(comm='oomtest-tp', oom_score_adj=7)
        [kill] = probe.get_and_flush().kills
        assert kill.victim_pid == victim.pid
        assert kill.victim_comm == 'oomtest-tp'
        assert kill.oom_score_adj == 7
        assert kill.memory is not None and kill.memory.anon_rss_kb > 16 * 1024
        # memcg vs system comes from the trigger's kernel stack here.
        assert kill.memcg_oom is True
        # The classic tracepoint gives a pid, not the task: no cgroup path.
        assert kill.cgroup_path is None
    finally:
        probe.close()


def test_probe_close_detaches_and_frees_everything():
    probe = load_oom_kill_probe(CORE_ONLY, log)
    assert our_program_ids('mark_victim_btf')
    probe.close()
    assert wait_until_gone('mark_victim_btf') == set()


@pytest.mark.oom
@pytest.mark.slow
def test_kills_beyond_the_buffer_are_counted_as_dropped(memory_cgroup):
    # One page of ring buffer holds 3 records of 1.3 kB.
    options = OOMKillProbeOptions(allow_runtime_compiled_fallback=False, max_buffered_kills=1)
    probe = load_oom_kill_probe(options, log)
    try:
        probe.get_and_flush()
        victims = [memory_cgroup.oom_kill(comm=f'burst-{i}') for i in range(5)]
        result = probe.get_and_flush()
        assert [k.victim_pid for k in result.kills] == [v.pid for v in victims[:3]]
        assert result.dropped == 2
        again = probe.get_and_flush()
        assert again.kills == [] and again.dropped == 0  # a drop is reported once
    finally:
        probe.close()


def test_record_layout_matches_the_compiled_object():
    obj = libbpf.BpfObject(str(bpf_file(CORE_OBJECT)))
    try:
        btf = obj.btf()
        record = btf.struct('oom_kill_record')
        assert btf.size(record) == RECORD.size
        assert btf.member(record, 'kernel_stack')[0] == 136
        assert btf.member(record, 'cgroup_names')[0] == 296
    finally:
        obj.close()


def test_kprobe_is_in_the_object_and_passes_the_verifier():
    """This kernel has no kprobes: the kprobe program must still load, then fail to attach."""
    obj = libbpf.BpfObject(str(bpf_file(CORE_OBJECT)))
    try:
        obj.set_autoload('mark_victim_btf', False)
        obj.set_autoload('mark_victim_tracepoint', False)
        obj.load()  # runs the verifier on the kprobe program
        assert obj.program_fd('oom_kill_process') > 0
        with pytest.raises(libbpf.LibbpfError) as error:
            obj.attach('oom_kill_process')
        assert error.value.errno != 0
    finally:
        obj.close()


def test_kprobe_is_rejected_here_for_the_right_reason():
    supported, reason = kernel.kprobe_support()
    assert not supported
    assert 'CONFIG_KPROBES' in reason
    probe = load_oom_kill_probe(CORE_ONLY, log)
    try:
        assert KPROBE not in probe.hooks
        assert probe.rejected_hooks[KPROBE] == reason
    finally:
        probe.close()


def test_tp_btf_is_chosen_from_btf_not_the_version_number():
    with libbpf.Btf.load_vmlinux() as btf:
        from datadog_checks.ebpf_probe.oom_kill import mark_victim_passes_task

        assert mark_victim_passes_task(btf) == (True, '')


def test_bcc_kprobe_variant_compiles_and_loads():
    defines = bcc_offsets(libbpf.Btf.load_vmlinux())
    defines.update(PAGE_SIZE_KB='4', USE_RINGBUF='1', RINGBUF_PAGES='16', HOOK_KPROBE='1', KPROBE_WRITES_RECORDS='1')
    program = BccProgram.compile(bpf_file(BCC_SOURCE), defines)
    try:
        bpf = program._bpf
        assert bpf.load_func(b'oom_kill_process_kprobe', bpf.KPROBE).fd > 0
    finally:
        program.close()


def test_bcc_variant_compiles_with_offsets_from_kernel_headers():
    """Without BTF, offsets come from the kernel headers BCC compiles with. Here those are
    Debian's 6.1 headers, not this kernel's, so only compiling and loading can be checked."""
    defines = bcc_offsets(None)
    assert defines == {'OFFSETS_FROM_HEADERS': '1'}
    defines.update(PAGE_SIZE_KB='4', USE_RINGBUF='1', RINGBUF_PAGES='16', HOOK_RAW_TP='1', HOOK_KPROBE='1')
    program = BccProgram.compile(bpf_file(BCC_SOURCE), defines)
    try:
        bpf = program._bpf
        assert bpf.load_func(b'oom_mark_victim_raw', bpf.RAW_TRACEPOINT).fd > 0
        assert bpf.load_func(b'oom_kill_process_kprobe', bpf.KPROBE).fd > 0
    finally:
        program.close()


def test_bcc_offsets_from_btf_match_the_kernel():
    with libbpf.Btf.load_vmlinux() as btf:
        defines = bcc_offsets(btf)
        task = btf.struct('task_struct')
        assert int(defines['OFF_TASK_TGID']) == btf.member(task, 'tgid')[0]
        # 6.18: kernfs_node.parent is __parent, rss_stat an array of percpu_counter.
        assert int(defines['OFF_KN_PARENT']) == btf.member(btf.struct('kernfs_node'), '__parent')[0]
        assert int(defines['RSS_STAT_STRIDE']) == btf.size(btf.struct('percpu_counter'))
        assert int(defines['MEMORY_CGRP_ID']) == btf.enum_value('cgroup_subsys_id', 'memory_cgrp_id')


class TestFallback:
    def corrupt_object(self, tmp_path):
        path = tmp_path / 'corrupt.bpf.o'
        path.write_bytes(b'\x7fELF' + b'\0' * 60)
        return str(path)

    def test_core_failure_falls_back_to_bcc_with_a_warning(self, tmp_path, caplog):
        options = OOMKillProbeOptions(core_object_path=self.corrupt_object(tmp_path))
        with caplog.at_level(logging.WARNING):
            probe = load_oom_kill_probe(options, log)
        try:
            assert probe.variant == 'bcc'
            [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert 'CO-RE load of the OOM kill probe failed' in warning.getMessage()
            assert 'bpf_object__open_file' in warning.getMessage()
        finally:
            probe.close()

    def test_core_failure_without_fallback_says_how_to_enable_it(self, tmp_path):
        options = OOMKillProbeOptions(
            core_object_path=self.corrupt_object(tmp_path), allow_runtime_compiled_fallback=False
        )
        with pytest.raises(ProbeLoadError) as error:
            load_oom_kill_probe(options, log)
        message = str(error.value)
        assert message.startswith('CO-RE load failed: bpf_object__open_file(corrupt.bpf.o) failed')
        assert 'allow_runtime_compiled_fallback: true' in message

    def test_both_failing_is_one_error_with_both_causes(self, tmp_path, monkeypatch):
        monkeypatch.setattr(bcc_loader, 'find_kernel_headers', lambda release=None: None)
        options = OOMKillProbeOptions(core_object_path=self.corrupt_object(tmp_path))
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
