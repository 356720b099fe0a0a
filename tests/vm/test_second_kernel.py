# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The same build on a second kernel: Debian 12's own 6.1, booted under qemu.

That kernel has kprobes and no bpf_map_sum_elem_count kfunc, so the kprobe on oom_kill_process
(with its oom_control fields) and the fallback entry counting run there for real. The CO-RE
object is the very file built on the host; the guest prints its results (guest.py) and these
tests read them. Run with `make test-kernels` (part of `make test` where qemu is installed).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / '.cache' / 'vm'
HERE = Path(__file__).resolve().parent
BOOT_TIMEOUT = 900

pytestmark = pytest.mark.vm


def build_overlay(work: Path) -> Path:
    """A second initramfs archive: /init, the guest scripts and the wheel of this checkout."""
    root = work / 'overlay'
    (root / 'opt' / 'ebpf-probe' / 'wheel').mkdir(parents=True)
    shutil.copy(HERE / 'init', root / 'init')
    shutil.copy(HERE / 'guest.py', root / 'opt' / 'ebpf-probe' / 'guest.py')
    for helper in ('cgroups.py', 'bpf_objects.py', 'processes.py'):
        shutil.copy(REPO / 'tests' / helper, root / 'opt' / 'ebpf-probe' / helper)
    dist = work / 'dist'
    subprocess.run([sys.executable, '-m', 'build', '--wheel', '--outdir', str(dist), str(REPO)], check=True,
                   capture_output=True)  # fmt: skip
    [wheel] = dist.glob('*.whl')
    zipfile.ZipFile(wheel).extractall(root / 'opt' / 'ebpf-probe' / 'wheel')
    archive = work / 'overlay.cpio'
    files = subprocess.run(['find', '.', '-print0'], cwd=root, capture_output=True, check=True).stdout
    with open(archive, 'wb') as out:
        subprocess.run(['cpio', '--null', '-o', '-H', 'newc', '--quiet'], cwd=root, input=files, stdout=out, check=True)
    return archive


def qemu_command(initrd: Path) -> list[str]:
    kvm = os.access('/dev/kvm', os.R_OK | os.W_OK) and 'vmx' in Path('/proc/cpuinfo').read_text()
    accel = ['-enable-kvm', '-cpu', 'host'] if kvm else ['-accel', 'tcg', '-cpu', 'max']
    return [
        'qemu-system-x86_64', *accel, '-m', '3072', '-smp', '2', '-nographic', '-no-reboot',
        '-kernel', str(CACHE / 'vmlinuz'), '-initrd', str(initrd),
        '-append', 'console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init',
    ]  # fmt: skip


@pytest.fixture(scope='module')
def guest(tmp_path_factory):
    """Boot the VM once and return what the guest reported."""
    for needed in ('vmlinuz', 'base.cpio'):
        assert (CACHE / needed).exists(), f'run tests/vm/build_base.sh (make test-kernels does) to make {needed}'
    work = tmp_path_factory.mktemp('vm')
    initrd = work / 'initrd.cpio'
    with open(initrd, 'wb') as out:  # concatenated archives: the overlay's files win
        for part in (CACHE / 'base.cpio', build_overlay(work)):
            with open(part, 'rb') as f:
                shutil.copyfileobj(f, out)
    console = subprocess.run(qemu_command(initrd), capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    output = console.stdout
    (REPO / '.cache' / 'vm' / 'last-console.log').write_text(output + console.stderr)
    begin, end = '=== ebpf-probe guest results begin ===', '=== ebpf-probe guest results end ==='
    assert begin in output and end in output, output[-5000:] + console.stderr[-2000:]
    results = json.loads(output.split(begin, 1)[1].split(end, 1)[0].strip())
    print(f'\nsecond kernel: {results["kernel"]}; guest steps took {results["seconds"]} s')
    return results


def test_it_ran_on_debian_12s_own_kernel_with_the_core_object_built_here(guest):
    assert guest['kernel'].startswith('6.1.')
    assert guest['package'].startswith('/opt/ebpf-probe/wheel/')
    built_here = REPO / 'datadog_checks' / 'ebpf_probe' / 'data' / 'bpf' / 'oom_kill.bpf.o'
    assert guest['core_object_sha256'] == hashlib.sha256(built_here.read_bytes()).hexdigest()


def test_the_kprobe_on_oom_kill_process_gives_the_oom_control_fields(guest):
    probe = guest['probe']
    assert 'error' not in probe, probe.get('error')
    assert probe['variant'] == 'co-re'
    assert probe['hooks'] == ['tp_btf/mark_victim', 'kprobe/oom_kill_process']
    [kill] = probe['kills']
    assert kill['victim_pid'] == probe['victim_pid']
    assert kill['victim_comm'] == 'vm-probe' and kill['oom_score_adj'] == 7
    assert kill['cgroup_path'] == probe['cgroup_path']
    assert kill['hook'] == 'tp_btf/mark_victim'
    # From oom_control, through the kprobe: memcg vs system, the domain's size, the badness.
    assert kill['memcg_oom'] is True
    assert kill['oom_domain_pages'] == 32 * 1024 * 1024 // 4096  # the cgroup's limit, no swap
    # The kernel's badness: RSS + swap + page tables, in pages, plus oom_score_adj per mille of the
    # domain (the RSS also holds what the process had before it joined the cgroup).
    memory = kill['memory']
    rss_and_tables = memory['anon_rss_kb'] + memory['file_rss_kb'] + memory['shmem_rss_kb'] + memory['pgtables_kb']
    expected = rss_and_tables // 4 + 7 * kill['oom_domain_pages'] // 1000
    assert abs(kill['badness_points'] - expected) <= expected // 20, (kill['badness_points'], expected)
    assert memory['anon_rss_kb'] > 16 * 1024
    assert probe['dropped'] == 0


def test_the_cli_reports_the_kill_made_between_its_runs(guest):
    cli = guest['cli']
    assert 'error' not in cli, cli.get('error')
    assert cli['returncode'] == 0, cli['stderr']
    assert 'Loaded the oom_kill probe (co-re) with tp_btf/mark_victim, kprobe/oom_kill_process' in cli['stderr']
    first, second = (run['aggregator'] for run in cli['runs'])
    assert first['events'] == []
    [event] = second['events']
    assert event['msg_title'] == f'OOM kill: vm-victim (pid {cli["victim_pid"]})'
    assert 'oom_score_adj 42' in event['msg_text']
    assert f'| OOM domain | {cli["limit_pages"]:,} pages;' in event['msg_text']
    assert 'trigger_type:cgroup' in event['tags'] and 'kernel:second' in event['tags']
    [count] = [m for m in second['metrics'] if m['metric'] == 'ebpf_probe.oom_kill.count']
    assert count['points'][0][1] == 1


def test_accounting_counts_entries_map_by_map_without_the_kfunc(guest):
    accounting = guest['accounting']
    assert 'error' not in accounting, accounting.get('error')
    assert 'iter/bpf_map' not in accounting['hooks'] and 'iter/task_file' in accounting['hooks']
    assert 'bpf_map_sum_elem_count' in accounting['rejected_hooks']['iter/bpf_map']
    assert any('counted map by map' in limitation for limitation in accounting['limitations'])
    for kind, m in accounting['maps'].items():
        assert m['entries'] == m['expected_entries'], kind
        assert m['method'] == ('for_each' if m['expected_entries'] is not None else None), kind
        assert m['memory'] == m['bpftool_memlock'], kind
        if m['expected_entries'] is not None:
            assert m['memory'] > 0, kind  # (6.1 reports no memlock for ring buffers: 0, as bpftool says)
        assert [o['pid'] for o in m['owners']] == [accounting['fixture_pid']], kind
    assert accounting['program_run_count'] == 300
