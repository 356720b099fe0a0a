# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .cgroups import MemoryCgroup

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session', autouse=True)
def bcc_kernel_headers() -> None:
    """Give BCC kernel headers when the machine has none for its kernel.

    This machine's kernel ships no headers; Debian's are joined into one folder by
    `make kernel-headers` (a test fixture: the product never touches /lib/modules).
    """
    release = os.uname().release
    if os.environ.get('BCC_KERNEL_SOURCE') or os.path.exists(f'/lib/modules/{release}/build'):
        return
    joined = os.environ.get('BCC_TEST_KERNEL_SOURCE') or str(REPO / '.cache' / 'kernel-headers')
    if os.path.isdir(joined):
        os.environ['BCC_KERNEL_SOURCE'] = joined


@pytest.fixture(autouse=True)
def fresh_persistent_cache() -> None:
    """Each test starts with the Agent's persistent cache empty, as a new Agent would have it."""
    from datadog_checks.base.stubs import datadog_agent

    datadog_agent._cache.clear()


@pytest.fixture(scope='session')
def root() -> None:
    assert os.geteuid() == 0, 'these tests load BPF programs and make memory cgroups: run them as root (make test)'


@pytest.fixture
def memory_cgroup(root: None) -> Iterator[MemoryCgroup]:
    cgroup = MemoryCgroup()
    try:
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def instance() -> dict:
    return {'tags': ['team:kernel', 'env_name:test']}
