# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Turning kernel strings into safe tags and event text. Pure functions, no I/O.

Process names and cgroup paths come from whoever named the process or cgroup:
they may hold separators, newlines, markdown or bytes that are not UTF-8.
"""

from __future__ import annotations

import re

from .containers import Container
from .oom_kill import OOMKill

MAX_TAG_LENGTH = 200
# Characters that break tags on some path to Datadog: DogStatsD separators, whitespace, control.
_TAG_UNSAFE = re.compile(r'[\s,|#\x00-\x1f\x7f-\x9f]+')
_CONTROL = re.compile(r'[\x00-\x1f\x7f-\x9f]')
_MARKDOWN_SPECIAL = re.compile(r'([\\`*_{}\[\]()#+\-.!|<>~&%])')  # '%': '%%%' delimits event markdown


def tag(key: str, value: object) -> str:
    """A `key:value` tag with unsafe characters replaced by '_' and the length bounded."""
    text = _TAG_UNSAFE.sub('_', str(value)).strip('_') or 'unknown'
    return f'{key}:{text}'[:MAX_TAG_LENGTH]


def _visible(text: str) -> str:
    """Control characters (newlines included) as \\xNN escapes."""
    return _CONTROL.sub(lambda m: f'\\x{ord(m.group()):02x}', text)


def markdown_text(value: object) -> str:
    """Any kernel string, shown literally in markdown."""
    return _MARKDOWN_SPECIAL.sub(r'\\\1', _visible(str(value)))


def plain_text(value: object) -> str:
    return _visible(str(value))


def kb(value: int) -> str:
    return f'{value:,} kB'


def oom_kill_tags(kill: OOMKill, container: Container | None) -> list[str]:
    tags = [tag('trigger_type', kill.trigger_type), tag('trigger_process_name', kill.trigger_comm)]
    if kill.victim_comm is not None:
        tags.append(tag('process_name', kill.victim_comm))
    if kill.cgroup_name is not None:
        tags.append(tag('cgroup_name', kill.cgroup_name))
    if container is not None:
        if container.id:
            tags.append(tag('container_id', container.id))
        if container.runtime:
            tags.append(tag('container_runtime', container.runtime))
        if container.pod_uid:
            tags.append(tag('pod_uid', container.pod_uid))
    return tags


def oom_kill_title(kill: OOMKill) -> str:
    name = plain_text(kill.victim_comm) if kill.victim_comm is not None else 'process'
    return f'OOM kill: {name} (pid {kill.victim_pid})'


def _constraint(kill: OOMKill) -> str:
    if kill.memcg_oom is None:
        return 'unknown (the kernel did not say whether a memory cgroup or the system was out of memory)'
    if kill.memcg_oom:
        return 'a memory cgroup reached its limit'
    return 'the system ran out of memory'


def oom_kill_text(kill: OOMKill, container: Container | None) -> str:
    """The event body: markdown, every kernel-supplied string escaped."""
    victim = f'**{markdown_text(kill.victim_comm)}**' if kill.victim_comm is not None else 'a process'
    lines = [
        '%%%',
        f"{victim} (pid {kill.victim_pid}) was killed by the kernel's OOM killer: {_constraint(kill)}.",
        '',
        '| | |',
        '|---|---|',
    ]
    victim_details = [f'pid {kill.victim_pid}']
    if kill.victim_uid is not None:
        victim_details.append(f'uid {kill.victim_uid}')
    if kill.oom_score_adj is not None:
        victim_details.append(f'oom_score_adj {kill.oom_score_adj}')
    lines.append(f'| Victim | {victim} ({", ".join(victim_details)}) |')
    lines.append(f'| Triggered by | **{markdown_text(kill.trigger_comm)}** (pid {kill.trigger_pid}) |')
    lines.append(f'| Constraint | {_constraint(kill)} (trigger_type:{kill.trigger_type}) |')
    if kill.cgroup_path is not None:
        lines.append(f'| Memory cgroup | {markdown_text(kill.cgroup_path)} |')
    if container is not None and container.id:
        runtime = f' ({markdown_text(container.runtime)})' if container.runtime else ''
        lines.append(f'| Container | {markdown_text(container.id)}{runtime} |')
    if container is not None and container.pod_uid:
        lines.append(f'| Pod UID | {markdown_text(container.pod_uid)} |')
    if kill.memory is not None:
        m = kill.memory
        lines.append(
            f'| Memory | rss {kb(m.rss_kb)} (anon {kb(m.anon_rss_kb)}, file {kb(m.file_rss_kb)}, '
            f'shmem {kb(m.shmem_rss_kb)}), total-vm {kb(m.total_vm_kb)}, page tables {kb(m.pgtables_kb)} |'
        )
    if kill.oom_domain_pages is not None and kill.badness_points is not None:
        lines.append(
            f"| OOM domain | {kill.oom_domain_pages:,} pages; victim's badness {kill.badness_points:,} points |"
        )
    lines.append(f'| Seen by | {kill.hook} |')
    lines.append('%%%')
    return '\n'.join(lines)


def aggregation_key(kill: OOMKill, container: Container | None) -> str:
    if container is not None and container.id:
        return container.id
    if kill.cgroup_path is not None:
        return kill.cgroup_path[:100]
    return 'system'
