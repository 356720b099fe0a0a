# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""A real container runtime for the tests: podman with crun, where it is installed (the VM row with
the `podman` layer, tests/vm/kernels.py).

    with start_container(memory='20m') as c:   # c.id, c.pid, c.cgroup
        ...                                     # the container waits, its process already in its cgroup
        outcome = c.allocate()                  # it now allocates until the kernel OOM-kills it

The image is a busybox tarball imported once (no registry), the container has no network, podman
keeps its storage in RAM and manages cgroups itself (cgroupfs manager: the guest has no systemd).
In the VM, podman puts a container's processes in the cgroup v2 `/libpod_parent/libpod-<full id>`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

IMAGE = 'localhost/ebpf-probe-busybox:latest'
IMAGE_TARBALL = '/opt/ebpf-probe/images/busybox.tar'
# Waits for /tmp/go (written from outside through /proc/<pid>/root), then allocates in 64 MiB blocks.
ALLOCATOR = 'while [ ! -e /tmp/go ]; do sleep 0.05; done; exec dd if=/dev/zero of=/dev/null bs=64M'


def unavailable() -> str | None:
    """Why containers cannot be run here (None when they can)."""
    if os.geteuid() != 0:
        return 'podman runs as root in these tests'
    if not shutil.which('podman'):
        return 'podman is not installed (the VM row with the podman layer has it: make test-kernels KERNELS=6.12)'
    if not os.path.exists(IMAGE_TARBALL):
        return f'the image tarball {IMAGE_TARBALL} is missing'
    return None


def podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(['podman', *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f'podman {" ".join(args)}: exit {result.returncode}: {result.stderr.strip()}')
    return result.stdout.strip()


def ensure_image() -> None:
    if subprocess.run(['podman', 'image', 'exists', IMAGE]).returncode != 0:
        podman('import', '--quiet', IMAGE_TARBALL, IMAGE)


@dataclass(frozen=True)
class Outcome:
    exit_code: int  # 137: SIGKILL
    oom_killed: bool  # as podman says (podman 4.3 with cgroupfs says False even for an OOM kill)
    state: dict


@dataclass
class Container:
    id: str  # the full 64-hex-digit id
    name: str
    pid: int  # the main process, as the host sees it
    cgroup: str  # its cgroup v2 path, as in /proc/<pid>/cgroup

    def allocate(self, timeout: float = 120) -> Outcome:
        """Let the container's process allocate past its limit, and wait for it to be gone."""
        with open(f'/proc/{self.pid}/root/tmp/go', 'w'):
            pass
        podman('wait', self.id, timeout=timeout)
        return self.outcome()

    def outcome(self) -> Outcome:
        [state] = json.loads(podman('inspect', self.id))
        return Outcome(state['State']['ExitCode'], state['State'].get('OOMKilled', False), state['State'])

    def remove(self) -> None:
        subprocess.run(['podman', 'rm', '--force', '--time', '0', self.id], capture_output=True, timeout=120)


def cgroup_of(pid: int) -> str:
    with open(f'/proc/{pid}/cgroup') as f:
        return next(line.split('::', 1)[1].strip() for line in f if line.startswith('0::'))


@contextmanager
def start_container(
    memory: str = '20m', name: str | None = None, command: str = ALLOCATOR, init: bool = False
) -> Iterator[Container]:
    """A detached container of the busybox image running `command` (by default: waits, then allocates
    when told), under podman's minimal init (catatonit, `--init`) if asked; removed afterwards."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    ensure_image()
    name = name or f'ebpf-probe-test-{uuid.uuid4().hex[:10]}'
    container_id = podman(
        'run', '--detach', '--name', name, '--network', 'none', '--memory', memory, *(['--init'] if init else []),
        IMAGE, 'sh', '-c', command,
    )  # fmt: skip
    try:
        assert re.fullmatch(r'[0-9a-f]{64}', container_id), container_id
        deadline = time.monotonic() + 30
        while True:
            [state] = json.loads(podman('inspect', container_id))
            pid = state['State']['Pid']
            if pid or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not pid:
            raise RuntimeError(f'container {name} has no process: {state["State"]}')
        yield Container(container_id, name, pid, cgroup_of(pid))
    finally:
        subprocess.run(['podman', 'rm', '--force', '--time', '0', container_id], capture_output=True, timeout=120)
