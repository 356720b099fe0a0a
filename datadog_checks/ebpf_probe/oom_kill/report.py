# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""An OOM kill as Datadog shows it: its tags, and its event's title, text and aggregation key."""

from __future__ import annotations

from datetime import datetime, timezone

from datadog_checks.ebpf_probe.containers import Container, cgroup_tags, parse_cgroup_path
from datadog_checks.ebpf_probe.formatting import kb, markdown_text, plain_text, tag

from . import record, user_space
from .record import OOMKill


def oom_kill_tags(kill: OOMKill, container: Container | None, cardinality: str) -> list[str]:
    """The kill's own tags, as many as the cardinality allows (the Agent's rules: a pod is
    orchestrator cardinality, a container high; a host cgroup, i.e. a service, is bounded)."""
    tags = []
    if kill.signal is None:  # a kill sent from user space has a killer (killer_tags), no trigger
        tags += [tag('trigger_type', kill.trigger_type), tag('trigger_process_name', kill.trigger_comm)]
    if kill.victim_comm is not None:
        tags.append(tag('process_name', kill.victim_comm))
    if kill.group_cgroup_path is not None:
        tags.append('oom_group:true')
    if kill.container_main_process is not None:
        tags.append(tag('container_main_process', str(kill.container_main_process).lower()))
    return tags + cgroup_tags(kill.cgroup_name, container, cardinality)


def killer_tags(kill: OOMKill, killer_type: str) -> list[str]:
    """Who killed: killer:kernel for the kernel's OOM killer, else the sender's name; and its kind."""
    tags = [tag('killer', user_space.killer_name(kill)), tag('killer_type', killer_type)]
    if kill.signal is not None:
        tags.append(tag('signal', kill.signal.name))
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


def _name(kill: OOMKill) -> str:
    return f'**{markdown_text(kill.victim_comm)}**' if kill.victim_comm is not None else 'a process'


def _memory(kill: OOMKill) -> str:
    if kill.memory is None:
        return 'unknown'
    m = kill.memory
    return (
        f'rss {kb(m.rss_kb)} (anon {kb(m.anon_rss_kb)}, file {kb(m.file_rss_kb)}, shmem {kb(m.shmem_rss_kb)}), '
        f'total-vm {kb(m.total_vm_kb)}, page tables {kb(m.pgtables_kb)}'
    )


def _domain_rows(kill: OOMKill) -> list[str]:
    """Which cgroup ran out, and how full it was: often not the victim's own (a pod's limit)."""
    rows = []
    domain = kill.domain
    if domain is not None:
        where = markdown_text(domain.cgroup_path) if domain.cgroup_path is not None else f'level {domain.level}'
        rows.append(f'| Out of memory | {where}: usage {kb(domain.usage_kb)} of a {kb(domain.limit_kb)} limit |')
        if domain.cgroup_path is not None and kill.cgroup_path not in (None, domain.cgroup_path):
            rows.append(
                "| Note | the victim's own cgroup did not reach a limit: its ancestor above did, and the kernel "
                'chose the victim among all the processes under it |'
            )
    if kill.oom_domain_pages is not None:
        badness = f"; victim's badness {kill.badness_points:,} points" if kill.badness_points is not None else ''
        rows.append(f'| OOM domain size | {kill.oom_domain_pages:,} pages{badness} |')
    return rows


def _container_rows(kill: OOMKill, container: Container | None) -> list[str]:
    rows = []
    if container is not None and container.id:
        runtime = f' ({markdown_text(container.runtime)})' if container.runtime else ''
        rows.append(f'| Container | {markdown_text(container.id)}{runtime} |')
    if container is not None and container.pod_uid:
        qos = f', QoS {container.qos_class}' if container.qos_class else ''
        rows.append(f'| Pod | uid {markdown_text(container.pod_uid)}{qos} |')
    process = _container_process(kill)
    if process is not None:
        rows.append(f'| Process | {process} |')
    return rows


def _container_process(kill: OOMKill) -> str | None:
    """What the victim was to its container, and so whether its death stopped it, or that it is not known."""
    role, parent = kill.container_role, kill.parent
    if role is None:
        return None
    where = f'pid {kill.ns_pid} in its pid namespace'
    if role == record.PID_1:
        return (
            "the container's main process (pid 1 in its pid namespace): the kernel ends every process of the "
            'namespace with it, so the container stopped'
        )
    if role == record.UNKNOWN or parent is None:
        return f'{where}; whether its death stopped the container is not known (its parent was not read)'
    init = f'**{markdown_text(parent.comm)}**'
    if role == record.CHILD_OF_MINIMAL_INIT:
        return (
            f"the container's main process ({where}): the child its init {init} (pid 1) started, and "
            f'{init} exits when it does, so the container stopped'
        )
    if role == record.ADOPTED_BY_MINIMAL_INIT:
        return (
            f'not the main process ({where}): an orphan its init {init} (pid 1) adopted, not the child '
            f'{init} started and exits with; its death alone does not stop the container'
        )
    if role == record.DESCENDANT:
        return (
            f'not the main process ({where}): a child of {init} (pid {parent.ns_pid} there); its death alone '
            'does not stop the container'
        )
    if role == record.CHILD_OF_PID_1:
        return (
            f'{where}, a child of its pid 1 {init}: whether the container stopped depends on what {init} does '
            'when a child dies (not known)'
        )
    return (  # ENTERED
        f'{where}, started into it from outside by {init} (host pid {parent.pid}): a process run with exec, '
        "or a container's main process in a pod that shares its pid namespace; whether the container "
        'stopped is not known'
    )


def _victim_row(kill: OOMKill) -> str:
    details = [victim_label(kill)]
    if kill.victim_uid is not None:
        details.append(f'uid {kill.victim_uid}')
    if kill.oom_score_adj is not None:
        details.append(f'oom_score_adj {kill.oom_score_adj}')
    return f'| Victim | {_name(kill)} ({", ".join(details)}) |'


def _event_body(first: str, rows: list[str]) -> str:
    """An event's markdown: a sentence, then a table of the rows."""
    return '\n'.join(['%%%', first, '', '| | |', '|---|---|', *rows, '%%%'])


def _cgroup_row(kill: OOMKill) -> list[str]:
    return [f'| Memory cgroup | {markdown_text(kill.cgroup_path)} |'] if kill.cgroup_path is not None else []


def _victim_closing_rows(kill: OOMKill, container: Container | None) -> list[str]:
    """What every kill event ends with: the container, the victim's memory, the hook that saw it."""
    rows = _container_rows(kill, container)
    if kill.memory is not None:
        rows.append(f'| Memory | {_memory(kill)} |')
    rows.append(f'| Seen by | {kill.hook} |')
    return rows


def oom_kill_text(kill: OOMKill, container: Container | None) -> str:
    """The event body: markdown, every kernel-supplied string escaped."""
    first = f"{_name(kill)} ({victim_label(kill)}) was killed by the kernel's OOM killer: {_constraint(kill)}."
    rows = [
        _victim_row(kill),
        f'| Triggered by | **{markdown_text(kill.trigger_comm)}** (pid {kill.trigger_pid}) |',
        f'| Constraint | {_constraint(kill)} (trigger_type:{kill.trigger_type}) |',
        *_cgroup_row(kill),
        *_domain_rows(kill),
        *_victim_closing_rows(kill, container),
    ]
    return _event_body(first, rows)


# What each kind of sender is, as an event says it.
_KILLER_KINDS = {
    user_space.MEMORY_KILLER: 'a user-space memory killer (memory_killers)',
    user_space.CONTAINER_RUNTIME: (
        'a container runtime: a stop (docker, podman or crictl stop or kill), a Kubernetes eviction or a failed '
        "liveness probe; the pod's Kubernetes events tell which"
    ),
    user_space.OTHER: 'another process, neither a memory killer nor a container runtime',
}


def signal_kill_title(kill: OOMKill, killer_type: str) -> str:
    name = plain_text(kill.victim_comm) if kill.victim_comm is not None else 'process'
    killer = plain_text(user_space.killer_name(kill))
    if killer_type == user_space.MEMORY_KILLER:
        return f'Memory kill by {killer}: {name} ({victim_label(kill)})'
    return f"Container's main process killed by {killer} (SIGKILL, exit 137): {name} ({victim_label(kill)})"


def _signals(kill: OOMKill) -> str:
    signal = kill.signal
    assert signal is not None
    if signal.number == record.SIGTERM:
        return 'SIGTERM: the process was gone by the next check run'
    if signal.after_sigterm:
        return 'SIGTERM, then SIGKILL (the process was still there)'
    return 'SIGKILL'


def _cgroup_memory_rows(kill: OOMKill) -> list[str]:
    memory = kill.signal.cgroup_memory if kill.signal is not None else None
    if memory is None:
        return []
    limit = f' of a {kb(memory.limit_kb)} limit' if memory.limit_kb < record.NO_LIMIT_KB else ', no limit'
    rows = [f'| Memory cgroup use | {kb(memory.usage_kb)}{limit}, when the signal was sent |']
    if memory.events:
        events = ', '.join(f'{name} {count:,}' for name, count in memory.events.items())
        rows.append(f'| memory.events | {events} |')
    if memory.pressure_some_avg10 is not None:
        rows.append(
            f'| Memory pressure | some avg10={memory.pressure_some_avg10:.2f}%, '
            f'full avg10={memory.pressure_full_avg10:.2f}% |'
        )
    return rows


def signal_kill_text(kill: OOMKill, container: Container | None, killer_type: str) -> str:
    """The event body of a kill sent from user space: who sent it, and the victim's cgroup as it found it."""
    victim = _name(kill)
    name = user_space.killer_name(kill)
    seen_as = f', process name {markdown_text(kill.trigger_comm)}' if name != kill.trigger_comm else ''
    killer = f'**{markdown_text(name)}** (pid {kill.trigger_pid}{seen_as})'
    if killer_type == user_space.MEMORY_KILLER:
        first = f'{victim} ({victim_label(kill)}) was killed by the memory killer {killer}, not by the kernel.'
    else:
        first = (
            f"{victim} ({victim_label(kill)}), its container's main process, was killed with SIGKILL by {killer}: "
            'the container stopped with exit code 137, and no OOM kill was involved.'
        )
    rows = [
        _victim_row(kill),
        f'| Killed by | {killer}: {_KILLER_KINDS[killer_type]} |',
        f'| Signals | {_signals(kill)} |',
        *_cgroup_row(kill),
        *_cgroup_memory_rows(kill),
        *_victim_closing_rows(kill, container),
    ]
    return _event_body(first, rows)


def sigterm_title(kill: OOMKill, survived: bool) -> str:
    """A memory killer's SIGTERM that killed nothing, or of which that is not known."""
    name = plain_text(kill.victim_comm) if kill.victim_comm is not None else 'process'
    killer = plain_text(kill.trigger_comm)
    if survived:
        return f'{name} ({victim_label(kill)}) survived a SIGTERM from {killer}'
    return f'{name} ({victim_label(kill)}) was sent SIGTERM by {killer}: whether it died of it is not known'


def sigterm_text(kill: OOMKill, container: Container | None, survived: bool) -> str:
    victim = _name(kill)
    sent = (
        f'The memory killer **{markdown_text(kill.trigger_comm)}** (pid {kill.trigger_pid}) sent {victim} '
        f'({victim_label(kill)}) SIGTERM'
    )
    if survived:
        outcome = f', and it was still running {user_space.SIGTERM_GRACE_SECONDS:.0f} s later: no kill.'
    else:
        outcome = (
            ". Whether it died of it is not known: the check does not see the host's processes (run the Agent "
            'with the host pid namespace, hostPID: true), so it is not counted as a kill.'
        )
    return _event_body(
        sent + outcome, [*_cgroup_row(kill), *_cgroup_memory_rows(kill), *_container_rows(kill, container)]
    )


def group_kill_title(kills: list[OOMKill]) -> str:
    group = kills[0].group_cgroup_path or '?'
    return f'OOM group kill: {len(kills)} processes in {plain_text(group.rsplit("/", 1)[-1] or group)}'


def group_kill_text(kills: list[OOMKill], container: Container | None) -> str:
    """One event for the processes of a memory.oom.group cgroup, killed together."""
    chosen = next((k for k in kills if k.chosen), kills[0])
    group = markdown_text(chosen.group_cgroup_path or '?')
    lines = [
        '%%%',
        f"The kernel's OOM killer killed {len(kills)} processes at once: the cgroup {group} has "
        f'memory.oom.group set, so all of it goes when one of its processes is chosen ({_constraint(chosen)}).',
        '',
        '| Process | Memory | |',
        '|---|---|---|',
    ]
    for kill in kills:
        role = 'chosen by the OOM killer' if kill.chosen and kill is chosen else 'killed with the group'
        lines.append(f'| {_name(kill)} ({victim_label(kill)}) | {_memory(kill)} | {role} |')
    lines += ['', '| | |', '|---|---|']
    lines.append(f'| Triggered by | **{markdown_text(chosen.trigger_comm)}** (pid {chosen.trigger_pid}) |')
    lines.append(f'| Constraint | {_constraint(chosen)} (trigger_type:{chosen.trigger_type}) |')
    lines += _domain_rows(chosen)
    lines += _container_rows(chosen, container)
    lines.append(f'| Seen by | {chosen.hook} |')
    lines.append('%%%')
    return '\n'.join(lines)


def _where(kill: OOMKill) -> str:
    container = parse_cgroup_path(kill.cgroup_path)
    if container is not None and container.id:
        return f'container {markdown_text(container.id[:12])}'
    if kill.cgroup_path is not None:
        return f'cgroup {markdown_text(kill.cgroup_path)}'
    return 'cgroup unknown'


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime('%H:%M:%S UTC')


def storm_title(rest: list[list[OOMKill]]) -> str:
    killed = sum(len(kills) for kills in rest)
    return f'OOM kill storm: {killed} more processes killed since the last run'


def storm_text(rest: list[list[OOMKill]], described: int) -> str:
    """The kills of a run beyond its events: how many, where and which, first and last time."""
    rows: dict[tuple[str, str, str], list[float]] = {}  # (where, process, killer) -> first, last, count
    for kills in rest:
        for kill in kills:
            key = (_where(kill), _name(kill), markdown_text(user_space.killer_name(kill)))
            row = rows.setdefault(key, [kill.timestamp, kill.timestamp, 0])
            row[0], row[1], row[2] = min(row[0], kill.timestamp), max(row[1], kill.timestamp), row[2] + 1
    killed = sum(len(kills) for kills in rest)
    lines = [
        '%%%',
        f"The kernel's OOM killer, or killers in user space, killed {killed} more processes ({len(rest)} kills) "
        f'since the last run than the {described} described in events of their own (max_oom_kill_events: '
        f'{described}); ebpf_probe.oom_kill.count and ebpf_probe.container_kill.count count every one.',
        '',
        '| Where | Process | Killed by | Kills | First | Last |',
        '|---|---|---|---|---|---|',
    ]
    for (where, process, killer), (first, last, count) in sorted(rows.items(), key=lambda item: (-item[1][2], item[0])):
        lines.append(f'| {where} | {process} | {killer} | {count} | {_clock(first)} | {_clock(last)} |')
    lines.append('%%%')
    return '\n'.join(lines)


GROUP_KILL_WINDOW = 1.0  # seconds: the kernel kills a group's members in one go


def group_members_together(kills: list[OOMKill]) -> list[list[OOMKill]]:
    """The kills as users see them: each on its own, but the members of one group kill together."""
    result: list[list[OOMKill]] = []
    open_groups: dict[tuple[str, int], list[OOMKill]] = {}
    for kill in kills:
        if kill.group_cgroup_path is None:
            result.append([kill])
            continue
        key = (kill.group_cgroup_path, kill.trigger_tid)
        members = open_groups.get(key)
        if members is not None and kill.timestamp - members[-1].timestamp <= GROUP_KILL_WINDOW:
            members.append(kill)
        else:
            members = open_groups[key] = [kill]
            result.append(members)
    return result


def aggregation_key(kill: OOMKill, container: Container | None) -> str:
    if container is not None and container.id:
        return container.id
    if kill.cgroup_path is not None:
        return kill.cgroup_path[:100]
    return 'system'
