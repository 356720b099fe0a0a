# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""An OOM kill as Datadog shows it: its tags, and its event's title, text and aggregation key."""

from __future__ import annotations

from datadog_checks.ebpf_probe.formatting import kb, markdown_text, plain_text, tag

from .containers import Container
from .record import OOMKill

# The Agent's tag cardinalities, from fewest series to most.
LOW, ORCHESTRATOR, HIGH = 'low', 'orchestrator', 'high'
CARDINALITIES = (LOW, ORCHESTRATOR, HIGH)


def oom_kill_tags(kill: OOMKill, container: Container | None, cardinality: str) -> list[str]:
    """The kill's own tags, as many as the cardinality allows (the Agent's rules: a pod is
    orchestrator cardinality, a container high; a host cgroup, i.e. a service, is bounded)."""
    level = CARDINALITIES.index(cardinality)
    tags = [tag('trigger_type', kill.trigger_type), tag('trigger_process_name', kill.trigger_comm)]
    if kill.victim_comm is not None:
        tags.append(tag('process_name', kill.victim_comm))
    if container is None:
        if kill.cgroup_name is not None:
            tags.append(tag('cgroup_name', kill.cgroup_name))
        return tags
    if container.runtime:
        tags.append(tag('container_runtime', container.runtime))
    if container.pod_uid and level >= CARDINALITIES.index(ORCHESTRATOR):
        tags.append(tag('pod_uid', container.pod_uid))
    if level >= CARDINALITIES.index(HIGH):
        if container.id:
            tags.append(tag('container_id', container.id))
        if kill.cgroup_name is not None:
            tags.append(tag('cgroup_name', kill.cgroup_name))
    return tags


def victim_label(kill: OOMKill) -> str:
    """'pid N', or 'thread N' when the hook named only the thread."""
    return f'pid {kill.victim_pid}' if kill.victim_pid is not None else f'thread {kill.victim_tid}'


def oom_kill_title(kill: OOMKill) -> str:
    name = plain_text(kill.victim_comm) if kill.victim_comm is not None else 'process'
    return f'OOM kill: {name} ({victim_label(kill)})'


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
        f"{victim} ({victim_label(kill)}) was killed by the kernel's OOM killer: {_constraint(kill)}.",
        '',
        '| | |',
        '|---|---|',
    ]
    victim_details = [victim_label(kill)]
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
