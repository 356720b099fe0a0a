# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Inside the VM row with podman (tests/vm/kernels.py): a real container runtime works as the
container tests expect. Marked vm: only the rows run it (they name this file)."""

import re
import subprocess

import pytest

from tests.containers_runtime import start_container, unavailable

pytestmark = [pytest.mark.vm, pytest.mark.oom, pytest.mark.usefixtures('root')]


def test_a_container_over_its_memory_limit_is_oom_killed_in_a_cgroup_named_after_its_id():
    reason = unavailable()
    assert reason is None, reason  # the row that runs this has podman: not having it is a failure
    with start_container(memory='20m') as container:
        assert re.fullmatch(r'[0-9a-f]{64}', container.id)
        # The layout of podman's cgroupfs manager (cgroup v2): one cgroup per container, under libpod_parent.
        assert container.cgroup == f'/libpod_parent/libpod-{container.id}'
        with open(f'/sys/fs/cgroup{container.cgroup}/memory.max') as f:
            assert int(f.read()) == 20 * 1024 * 1024
        outcome = container.allocate()
    assert outcome.exit_code == 137, outcome.state
    # The kernel's own report names the container's cgroup and the killed process.
    dmesg = subprocess.run(['dmesg'], capture_output=True, text=True, check=True).stdout
    report = [line for line in dmesg.splitlines() if f'task_memcg={container.cgroup},' in line]
    assert report, dmesg[-3000:]
    assert f'oom_memcg={container.cgroup},' in report[-1]
    assert f'task=dd,pid={container.pid},' in report[-1]
