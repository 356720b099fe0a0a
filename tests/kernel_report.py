# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel's own report of its OOM kills (/dev/kmsg), the reference the probe is compared with."""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass, field

_KILLED = re.compile(
    r'Killed process (?P<pid>\d+) \((?P<comm>.*)\) total-vm:(?P<total_vm>\d+)kB, anon-rss:(?P<anon>\d+)kB, '
    r'file-rss:(?P<file>\d+)kB, shmem-rss:(?P<shmem>\d+)kB, UID:(?P<uid>\d+) pgtables:(?P<pgtables>\d+)kB '
    r'oom_score_adj:(?P<adj>-?\d+)'
)
_CONSTRAINT = re.compile(
    r'oom-kill:constraint=(?P<constraint>\w+),.*?(?:oom_memcg=(?P<oom_memcg>[^,]*),)?'
    r'task_memcg=(?P<task_memcg>[^,]*),task=(?P<task>.*),pid=(?P<pid>\d+),uid=(?P<uid>\d+)'
)
_USAGE = re.compile(r'^memory: usage (?P<usage>\d+)kB, limit (?P<limit>\d+)kB')
_INVOKED = re.compile(r'^(?P<comm>.*) invoked oom-killer: .*oom_score_adj=(?P<adj>-?\d+)')


@dataclass
class KernelOomReport:
    """One OOM kill as the kernel printed it."""

    pid: int
    comm: str
    total_vm_kb: int
    anon_rss_kb: int
    file_rss_kb: int
    shmem_rss_kb: int
    uid: int
    pgtables_kb: int
    oom_score_adj: int
    trigger_comm: str | None = None
    constraint: str | None = None  # CONSTRAINT_MEMCG, CONSTRAINT_NONE...
    oom_memcg: str | None = None
    task_memcg: str | None = None
    usage_kb: int | None = None  # of the OOM domain (memory cgroups only)
    limit_kb: int | None = None
    lines: list[str] = field(default_factory=list)


class KernelLog:
    """The kernel's messages from the moment it is opened: `with KernelLog() as log: ...; log.oom_reports()`.

    full=True first waits out the kernel's rate limit on OOM report headers (the trigger, the
    constraint and the cgroup's usage lines), for tests that compare with them.
    """

    def __init__(self, full: bool = False):
        self._full = full

    def __enter__(self) -> KernelLog:
        if self._full:
            from .cgroups import wait_for_full_oom_reports

            wait_for_full_oom_reports()
        self._fd = os.open('/dev/kmsg', os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)
        self._messages: list[str] = []
        return self

    def __exit__(self, *exc: object) -> None:
        self.messages()
        os.close(self._fd)
        self._fd = -1
        if any('Killed process' in message for message in self._messages):
            from .cgroups import LAST_KILL

            LAST_KILL[0] = time.monotonic()

    def messages(self) -> list[str]:
        """Every message printed since the start (records are 'prio,seq,time,flags;text')."""
        while self._fd >= 0:
            try:
                record = os.read(self._fd, 8192)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    return self._messages
                if e.errno == errno.EPIPE:  # overwritten before read: go on with the next
                    continue
                raise
            if not record:
                return self._messages
            text = record.decode('utf-8', 'backslashreplace').split(';', 1)[-1].split('\n', 1)[0]
            self._messages.append(text)
        return self._messages

    def oom_reports(self) -> list[KernelOomReport]:
        return oom_reports(self.messages())


def oom_reports(messages: list[str]) -> list[KernelOomReport]:
    """Each `Killed process` with the lines of its report before it (trigger, constraint, usage)."""
    reports = []
    context: dict[str, str] = {}
    lines: list[str] = []
    for message in messages:
        lines.append(message)
        if match := _INVOKED.search(message):
            context = {'trigger_comm': match['comm']}
            lines = [message]
        elif match := _USAGE.search(message):
            context.setdefault('usage', match['usage'])
            context.setdefault('limit', match['limit'])
        elif match := _CONSTRAINT.search(message):
            context.update(constraint=match['constraint'], task_memcg=match['task_memcg'])
            if match['oom_memcg'] is not None:
                context['oom_memcg'] = match['oom_memcg']
        elif match := _KILLED.search(message):
            reports.append(
                KernelOomReport(
                    pid=int(match['pid']),
                    comm=match['comm'],
                    total_vm_kb=int(match['total_vm']),
                    anon_rss_kb=int(match['anon']),
                    file_rss_kb=int(match['file']),
                    shmem_rss_kb=int(match['shmem']),
                    uid=int(match['uid']),
                    pgtables_kb=int(match['pgtables']),
                    oom_score_adj=int(match['adj']),
                    trigger_comm=context.get('trigger_comm'),
                    constraint=context.get('constraint'),
                    oom_memcg=context.get('oom_memcg'),
                    task_memcg=context.get('task_memcg'),
                    usage_kb=int(context['usage']) if 'usage' in context else None,
                    limit_kb=int(context['limit']) if 'limit' in context else None,
                    lines=lines,
                )
            )
            context, lines = {}, []
    return reports
