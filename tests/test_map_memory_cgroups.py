# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Map memory charged to memory cgroups (5.11+), against what the cgroup's own usage shows.

A process in a memory cgroup of its own creates a map; the cgroup's usage (memory.current on v2,
memory.usage_in_bytes on v1: what counts against its limit) grows by about the map's memory,
though the process itself allocated nothing.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datadog_checks.ebpf_probe import EbpfProbeCheck
from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe

from . import kernels
from .cgroups import MemoryCgroup
from .processes import read_until

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
KERNEL = kernels.current()
CHECKOUT = Path(__file__).resolve().parent.parent
VALUE_SIZE, ENTRIES = 1024, 8192  # a preallocated hash map of about 8 MB

# Loads what it needs, joins the cgroup (what it allocated before stays charged where it was), says
# so, and on a line from the test creates the map and says its id; holds it until stdin closes.
CREATOR = f"""
import os, sys
sys.path.insert(0, {str(CHECKOUT)!r})
from datadog_checks.ebpf_probe.kernel import libbpf
from tests.bpf_syscalls import map_create
os.close(map_create(1, 'warm_up', 4, 8, 1))  # libbpf's own first-call work, charged where it runs now
with open(sys.argv[1], 'w') as f:
    f.write(str(os.getpid()))
print('joined', flush=True)
sys.stdin.readline()
fd = map_create(1, 'charged_map', 4, {VALUE_SIZE}, {ENTRIES})
print('map', libbpf.map_info(fd).id, flush=True)
sys.stdin.read()
"""


def usage(cgroup: MemoryCgroup) -> int:
    name = 'memory.current' if cgroup.version == 2 else 'memory.usage_in_bytes'
    return int(Path(cgroup.dir, name).read_text())


@pytest.fixture
def charged():
    """(the cgroup, the map's id, how much the cgroup's usage grew when the map was made)."""
    cgroup = MemoryCgroup(limit_mb=256, prefix='ebpf-probe-maps')
    creator = subprocess.Popen(
        [sys.executable, '-c', CREATOR, os.path.join(cgroup.dir, 'cgroup.procs')],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        read_until(creator.stdout, 'joined')
        before = usage(cgroup)
        creator.stdin.write('go\n')
        creator.stdin.flush()
        map_id = int(read_until(creator.stdout, 'map').split()[-1])
        grown = usage(cgroup) - before
        yield cgroup, map_id, grown
    finally:
        creator.kill()
        creator.wait()
        cgroup.remove()


@pytest.fixture
def probe():
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    yield probe
    probe.close()


def charges_maps() -> bool | None:
    return KERNEL.maps_charged_to_memcg if KERNEL is not None else None


def test_a_map_is_charged_to_the_memory_cgroup_of_the_process_that_made_it(charged, probe):
    cgroup, map_id, grown = charged
    snapshot = probe.snapshot()
    [record] = [m for m in snapshot.maps if m.id == map_id]
    assert record.memory_bytes >= VALUE_SIZE * ENTRIES
    if charges_maps() is False:
        assert record.memory_cgroup_id is None  # the kernel charges maps to no cgroup: nothing is said
        return
    if record.memory_cgroup_id is None:
        assert charges_maps() is None, f'{KERNEL.name} charges maps to memory cgroups, but none was read'
        pytest.skip('this kernel, not in the table, does not charge maps to memory cgroups (said as not known)')
    assert record.memory_cgroup_id == cgroup.inode
    assert snapshot.memory_cgroups[cgroup.inode] == cgroup.path
    # The cgroup's usage grew by the map's memory (what counts against its limit), within the
    # kernel's per-CPU charge batches and the process's own few pages.
    assert 0.8 * record.memory_bytes <= grown <= 1.25 * record.memory_bytes + 2 * 1024 * 1024, (grown, record)


def own_memory_cgroup(cgroup_version: int) -> str:
    """This process's memory cgroup, as /proc/self/cgroup names it."""
    for line in Path('/proc/self/cgroup').read_text().splitlines():
        _, controllers, path = line.split(':', 2)
        if (cgroup_version == 2 and controllers == '') or (cgroup_version == 1 and 'memory' in controllers.split(',')):
            return path
    raise AssertionError('no memory cgroup in /proc/self/cgroup')


def test_the_probes_own_maps_are_charged_to_this_processs_cgroup(charged, probe):
    cgroup = charged[0]
    mine = [m for m in probe.snapshot().maps if m.name.startswith('ebpf_sta')]  # the probe's own, made here
    assert mine
    if charges_maps() is False:
        assert all(m.memory_cgroup_id is None for m in mine)
        return
    path = own_memory_cgroup(cgroup.version)
    root = os.path.dirname(cgroup.dir[: -len(cgroup.path)] + '/x')  # the hierarchy's mount
    # The root cgroup's processes charge nothing (0); a process elsewhere charges its cgroup.
    expected = 0 if path == '/' else os.stat(root + path).st_ino
    charged_to = {m.memory_cgroup_id for m in mine}
    if charges_maps() is None:  # not in the table: charged here, or not said
        assert charged_to in ({expected}, {None})
    else:
        assert charged_to == {expected}


def test_the_check_reports_memory_charged_per_cgroup(charged, dd_run_check, aggregator):
    cgroup, map_id, _ = charged
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_oom_kill': False}])
    try:
        dd_run_check(check)
    finally:
        check.cancel()
    points = [m for m in aggregator.metrics('ebpf_probe.maps.charged_memory') if f'cgroup_name:{cgroup.name}' in m.tags]
    if charges_maps() is False:
        assert points == []
        return
    [point] = points
    [record] = [m for m in check_snapshot_maps() if m.id == map_id]
    assert point.value == record.memory_bytes  # the only map in that cgroup


def check_snapshot_maps():
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        return probe.snapshot().maps
    finally:
        probe.close()


def test_the_owner_of_a_map_is_known_by_its_memory_cgroup(charged, probe):
    cgroup, map_id, _ = charged
    snapshot = probe.snapshot()
    [record] = [m for m in snapshot.maps if m.id == map_id]
    [owner] = record.owners
    assert owner.memory_cgroup_id == cgroup.inode  # read in the kernel, on every kernel
    assert snapshot.memory_cgroups[cgroup.inode] == cgroup.path
