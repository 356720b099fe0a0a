# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""What this process and the running kernel allow the probes, checked before loading, with what to do about each gap."""

from __future__ import annotations

import os
import re
import resource

LOCKDOWN = '/sys/kernel/security/lockdown'
PERF_EVENT_PARANOID = '/proc/sys/kernel/perf_event_paranoid'

# Oldest kernel with what the programs need: BPF global data (.rodata, 5.2), fields of 4.19 (they
# read), raw tracepoints and bpf_get_stack (4.18). The kernel matrix tests from 5.10 (TESTED_FROM).
MIN_KERNEL = (5, 2)
TESTED_FROM = (5, 10)
# CAP_BPF and CAP_PERFMON split off CAP_SYS_ADMIN in 5.8.
CAP_BPF_KERNEL = (5, 8)
# From 5.11 BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK.
MEMCG_ACCOUNTING_KERNEL = (5, 11)

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAPABILITY_NAMES = {CAP_SYS_ADMIN: 'CAP_SYS_ADMIN', CAP_PERFMON: 'CAP_PERFMON', CAP_BPF: 'CAP_BPF'}


class RequirementError(RuntimeError):
    """Something the probe needs is missing; the message says what to do."""


def kernel_release() -> str:
    return os.uname().release


def kernel_version(release: str | None = None) -> tuple[int, int, int]:
    """(major, minor, patch) from a release string such as '6.18.44-fc-v657'."""
    match = re.match(r'(\d+)\.(\d+)(?:\.(\d+))?', release or kernel_release())
    if not match:
        return (0, 0, 0)
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def effective_capabilities(status_path: str = '/proc/self/status') -> int:
    """This process's effective capability set, as a bit mask."""
    with open(status_path) as f:
        for line in f:
            if line.startswith('CapEff:'):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities(caps: int, version: tuple[int, int, int]) -> list[str]:
    """Capabilities BPF tracing needs that `caps` lacks (empty when enough)."""
    if caps & (1 << CAP_SYS_ADMIN):
        return []
    if version[:2] < CAP_BPF_KERNEL:
        return ['CAP_SYS_ADMIN']
    return [CAPABILITY_NAMES[c] for c in (CAP_BPF, CAP_PERFMON) if not caps & (1 << c)]


def check_privileges(version: tuple[int, int, int] | None = None) -> None:
    version = version or kernel_version()
    missing = missing_capabilities(effective_capabilities(), version)
    if missing:
        if version[:2] < CAP_BPF_KERNEL:
            need = 'CAP_SYS_ADMIN (this kernel predates CAP_BPF)'
        else:
            need = 'CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN'
        raise RequirementError(
            f'missing capabilities {", ".join(missing)}: loading eBPF tracing programs needs {need}; '
            'run the Agent as root or grant them (Kubernetes: securityContext.capabilities.add)'
        )


def perf_event_restriction(path: str = PERF_EVENT_PARANOID, caps: int | None = None) -> str:
    """Why the kernel may refuse the perf events tracepoints and kprobes attach through, said when it did.

    Debian and Android kernels add perf_event_paranoid level 3, under which only privileged
    processes open perf events; some (Debian 11's 5.10) count only CAP_SYS_ADMIN as privileged,
    not CAP_PERFMON.
    """
    try:
        with open(path) as f:
            level = int(f.read())
    except (OSError, ValueError):
        return ''
    caps = effective_capabilities() if caps is None else caps
    if level < 3 or caps & (1 << CAP_SYS_ADMIN):
        return ''
    return (
        f'kernel.perf_event_paranoid is {level}, under which some kernels open the perf events that '
        'tracepoints and kprobes attach through only with CAP_SYS_ADMIN: grant CAP_SYS_ADMIN, or set '
        'kernel.perf_event_paranoid=2'
    )


def check_kernel_version(version: tuple[int, int, int] | None = None) -> None:
    version = version or kernel_version()
    if version[:2] < MIN_KERNEL:
        raise RequirementError(
            f'kernel {kernel_release()} is too old: the OOM kill probe needs BPF global data (Linux 5.2) and '
            f'kernel fields of 4.19; it is tested from Linux {TESTED_FROM[0]}.{TESTED_FROM[1]}'
        )


def check_lockdown(path: str = LOCKDOWN) -> None:
    try:
        with open(path) as f:
            mode = f.read()
    except OSError:
        return  # securityfs not mounted or no lockdown LSM: nothing to refuse us
    if '[confidentiality]' in mode:
        raise RequirementError(
            'kernel lockdown is "confidentiality", which forbids eBPF programs from reading kernel memory; '
            'boot with lockdown=integrity or none to use this check'
        )


# What the check's BPF objects lock at most, beyond the OOM kill buffer: programs, iterators, small maps.
MEMLOCK_FOR_OBJECTS = 4 << 20


def raise_memlock_limit(needed: int, version: tuple[int, int, int] | None = None) -> None:
    """Before 5.11, BPF memory counts against RLIMIT_MEMLOCK (the user's locked pages, shared by all
    its processes): raise the limit by what the probes need, not to infinity for the whole Agent, or
    say how to. From 5.11 the memory cgroup accounts for it: nothing to do."""
    version = version or kernel_version()
    if version[:2] >= MEMCG_ACCOUNTING_KERNEL:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return
    wanted = soft + needed + MEMLOCK_FOR_OBJECTS
    if hard != resource.RLIM_INFINITY and hard < wanted:
        hard = wanted  # raising the hard limit needs CAP_SYS_RESOURCE
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (wanted, hard))
    except (ValueError, OSError) as e:
        raise RequirementError(
            f'the locked-memory limit is {soft} bytes and cannot be raised by the {wanted - soft} the probes '
            f'need ({e}); on kernels before 5.11 BPF maps count against it: start the Agent with '
            'LimitMEMLOCK=infinity (systemd) or ulimit -l unlimited, or grant CAP_SYS_RESOURCE'
        ) from None
