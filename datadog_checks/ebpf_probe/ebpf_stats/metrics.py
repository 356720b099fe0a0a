# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""eBPF stats snapshots -> metric points. Pure logic: no kernel, no Agent.

Cardinality is bounded by design: series are keyed by name, type and owner,
never by the kernel's ids (they change every time a program is reloaded), so
objects that share all three (say, the `.rodata` maps of several copies of
one tool) are summed into one series, with `instances` saying how many.
Patterns and a per-kind limit cap the rest; totals always count everything.
Run time and run counts are submitted as counts of what happened since the
previous run (the deltas are kept per program id, so a program that comes or
goes between runs never makes a series jump). When the kernel counted only a
share of the interval (statistics on for a window of it), run time and run
counts are scaled to the whole interval; recursion and kprobe misses are
counted by the kernel all the time and never scaled.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from datadog_checks.ebpf_probe.containers import LOW, Container, cgroup_tags, parse_cgroup_path
from datadog_checks.ebpf_probe.formatting import tag

from .records import EbpfSnapshot, MapRecord, Owner, ProgramRecord

GAUGE = 'gauge'
COUNT = 'count'
SELF_TAG = 'ebpf_probe_self:true'
# A program no link holds: attached another way (tc through netlink, a perf event ioctl as BCC does,
# a socket option, a program array) or not at all; the kernel does not tell which.
NO_LINK_TAG = 'attach_type:no_link'
MAX_ATTACH_TARGETS = 10  # per program series


class Point(NamedTuple):
    metric: str  # without the ebpf_probe. namespace
    type: str  # GAUGE or COUNT
    value: float
    tags: tuple[str, ...]


@dataclass(frozen=True)
class NamePatterns:
    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()

    @classmethod
    def compile(cls, include: Iterable[str] | None, exclude: Iterable[str] | None) -> NamePatterns:
        return cls(tuple(re.compile(p) for p in include or ()), tuple(re.compile(p) for p in exclude or ()))

    def allows(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)


@dataclass(frozen=True)
class MetricOptions:
    own_pid: int
    exclude_own_objects: bool = False
    programs: NamePatterns = NamePatterns()
    maps: NamePatterns = NamePatterns()
    max_programs: int = 200
    max_maps: int = 200
    run_time: bool = True
    cardinality: str = LOW  # of the tags of the cgroups maps are charged to
    # The Agent's tags of a container (its tagger), at a cardinality; none without the Agent.
    container_tags: Callable[[Container, str], Sequence[str]] | None = None


def owner_label(owners: Sequence[Owner], pinned: bool) -> str:
    """Who holds an object: the process that does (lowest pid first), else 'pinned' (bpffs) or 'kernel'."""
    if owners:
        return min(owners).comm  # Owner orders by pid first
    return 'pinned' if pinned else 'kernel'


# program id -> run time (ns), run count, recursion misses (None: not read), kprobe misses (None: not a kprobe)
Counters = tuple[int, int, int | None, int | None]


def _delta(now: int | None, before: int | None) -> int | None:
    """A counter's progress (a reset counts as none); None where either read is missing."""
    return None if now is None or before is None else max(0, now - before)


class StatsMetrics:
    """Turns successive snapshots into points, keeping what it needs between runs (program counters).

    Thousands of objects come back every run: tags are made once per name (and kept while the name
    is seen), and once per set of owners within a run.
    """

    def __init__(self, options: MetricOptions):
        self.options = options
        self._previous: dict[int, Counters] = {}
        self._previous_time: float | None = None
        self._tags: dict[tuple[str, str], str] = {}  # (key, value) -> safe tag, for the names seen last run
        self._tags_used: dict[tuple[str, str], str] = {}
        self._owner_tags: dict[tuple[int, bool], tuple[tuple[str, ...], bool]] = {}  # within one run
        self._cgroups: dict[int, str | None] = {}  # the run's memory cgroups: id -> path
        # kind -> object id -> (what its tags depend on, totals tags, series tags or None), kept while seen
        self._series: dict[str, dict[int, tuple]] = {}
        self._series_used: dict[str, dict[int, tuple]] = {}

    def _tag(self, key: str, value: str) -> str:
        """tag(), remembered from one run to the next."""
        cache_key = (key, value)
        text = self._tags.get(cache_key)
        if text is None:
            text = tag(key, value)
        self._tags_used[cache_key] = text
        return text

    def _owner(self, owners: Sequence[Owner], pinned: bool) -> tuple[tuple[str, ...], bool]:
        """(owner tags, whether the object is the check's own), once per tuple of owners in a run."""
        key = (id(owners), pinned)  # the records, holding the tuples, outlive the run's cache
        found = self._owner_tags.get(key)
        if found is None:
            own = any(o.pid == self.options.own_pid for o in owners)
            tags: tuple[str, ...] = (self._tag('owner', owner_label(owners, pinned)),)
            if owners:
                tags += self._owner_cgroup_tags(min(owners).memory_cgroup_id)
            found = self._owner_tags[key] = ((*tags, SELF_TAG) if own else tags, own)
        return found

    def _owner_cgroup_tags(self, cgroup_id: int) -> tuple[str, ...]:
        """The named owner's container tags (two `cilium-agent`s of two pods are two series), or its
        systemd service on the host; none where its cgroup is not known."""
        path = self._cgroups.get(cgroup_id) if cgroup_id else None
        if path is None:
            return ()
        container = parse_cgroup_path(path)
        if container is None:
            leaf = path.rsplit('/', 1)[-1]
            return (self._tag('owner_service', leaf),) if leaf.endswith('.service') else ()
        tags = tuple(cgroup_tags(None, container, self.options.cardinality))
        if self.options.container_tags is not None:
            tags += tuple(self.options.container_tags(container, self.options.cardinality))
        return tags

    def points(self, snapshot: EbpfSnapshot) -> list[Point]:
        self._cgroups = snapshot.memory_cgroups
        interval = None if self._previous_time is None else snapshot.timestamp - self._previous_time
        deltas = self._deltas(snapshot.programs)
        self._previous_time = snapshot.timestamp
        scale = snapshot.run_time.scale if snapshot.run_time is not None else None
        try:
            programs = self._groups(
                snapshot.programs, 'programs', 'program_name', 'program_type', self.options.programs
            )
            maps = self._groups(snapshot.maps, 'maps', 'map_name', 'map_type', self.options.maps)
            points = programs[0] + maps[0]
            points += self._program_points(programs[1], deltas, interval, scale)
            points += self._map_points(maps[1])
            points += self._charged_memory_points(snapshot)
        finally:
            self._tags, self._tags_used = self._tags_used, {}
            self._series, self._series_used = self._series_used, {}
            self._owner_tags = {}
        return points

    def _deltas(self, programs: list[ProgramRecord]) -> dict[int, Counters]:
        deltas = {}
        current = {}
        previous = self._previous
        for p in programs:
            now = (p.run_time_ns, p.run_count, p.recursion_misses, p.kprobe_misses)
            current[p.id] = now
            before = previous.get(p.id)
            if before is not None:
                # A counter going backwards (reset) counts as no progress, never negative.
                deltas[p.id] = (
                    max(0, now[0] - before[0]),
                    max(0, now[1] - before[1]),
                    _delta(now[2], before[2]),
                    _delta(now[3], before[3]),
                )
        self._previous = current
        return deltas

    def _groups(self, records, kind: str, name_key: str, type_key: str, patterns: NamePatterns):
        """(totals points, series): totals by type and owner count every object; series (name, type and
        owner -> members) only those the patterns and exclude_own_objects let through."""
        totals: dict[tuple[str, ...], list[int]] = {}
        groups: dict[tuple[str, ...], list] = {}
        filtered = bool(patterns.include or patterns.exclude)
        exclude_own = self.options.exclude_own_objects
        seen, used = self._series.get(kind, {}), {}
        for r in records:
            # What an object's tags depend on; the same as last run for almost every object.
            # The owners' tuple itself too: a new scan makes a new one, whose cgroups may differ.
            key = (r.name, r.type, r.owners, id(r.owners), r.pinned)
            cached = seen.get(r.id)
            if cached is None or cached[0] != key:
                owner_tags, own = self._owner(r.owners, r.pinned)
                type_tag = self._tag(type_key, r.type)
                series = None
                if not (exclude_own and own) and not (filtered and not patterns.allows(r.name)):
                    series = (self._tag(name_key, r.name), type_tag, *owner_tags)
                cached = (key, (type_tag, *owner_tags), series)
            used[r.id] = cached
            _, total_tags, series = cached
            total = totals.get(total_tags)
            if total is None:
                total = totals[total_tags] = [0, 0]
            total[0] += 1
            total[1] += r.memory_bytes or 0
            if series is not None:
                members = groups.get(series)
                if members is None:
                    groups[series] = [r]
                else:
                    members.append(r)
        self._series_used[kind] = used
        points = []
        for tags, (count, memory) in sorted(totals.items()):
            points.append(Point(f'{kind}.total', GAUGE, count, tags))
            points.append(Point(f'{kind}.memory', GAUGE, memory, tags))
        return points, groups

    @staticmethod
    def _top(groups: dict[tuple[str, ...], list], limit: int, cost) -> tuple[list, int]:
        """(the `limit` costliest groups, how many objects the others hold); ranked only when some must go."""
        if len(groups) <= limit:
            return list(groups.items()), 0
        ranked = sorted(groups.items(), key=cost)
        return ranked[:limit], sum(len(members) for _, members in ranked[limit:])

    def _program_points(
        self,
        groups: dict[tuple[str, ...], list[ProgramRecord]],
        deltas: dict[int, Counters],
        interval: float | None,
        scale: float | None,
    ) -> list[Point]:
        def cost(item: tuple[tuple[str, ...], list[ProgramRecord]]) -> tuple:
            tags, members = item
            run_time = sum(deltas[p.id][0] for p in members if p.id in deltas)
            return (-run_time, -sum(p.memory_bytes or 0 for p in members), tags)

        kept, unreported = self._top(groups, self.options.max_programs, cost)
        points = [Point('programs.unreported', GAUGE, unreported, ())]
        with_run_time = self.options.run_time and scale is not None
        for tags, members in kept:
            translated = jited = verified = memory = 0
            memory_known = verified_known = True
            for p in members:
                translated += p.translated_bytes
                jited += p.jited_bytes
                if p.verified_instructions is None:
                    verified_known = False
                else:
                    verified += p.verified_instructions
                if p.memory_bytes is None:
                    memory_known = False
                else:
                    memory += p.memory_bytes
            points.append(Point('program.instances', GAUGE, len(members), tags))
            points += self._attachment_points(members, tags)
            points.append(Point('program.translated_size', GAUGE, translated, tags))
            points.append(Point('program.jited_size', GAUGE, jited, tags))
            if verified_known:
                points.append(Point('program.verified_instructions', GAUGE, verified, tags))
            if memory_known:
                points.append(Point('program.memory', GAUGE, memory, tags))
            known = [deltas[p.id] for p in members if p.id in deltas]
            if not known:
                continue  # first sight of these programs: nothing to compare with yet
            kprobe_misses = [d[3] for d in known if d[3] is not None]
            if kprobe_misses:
                points.append(Point('program.kprobe_misses', COUNT, sum(kprobe_misses), tags))
            # The kernel counts recursion misses all the time, statistics on or not.
            recursion_misses = [d[2] for d in known if d[2] is not None]
            if recursion_misses:
                points.append(Point('program.recursion_misses', COUNT, sum(recursion_misses), tags))
            if not with_run_time:
                continue
            assert scale is not None
            counted_time, counted_runs = sum(d[0] for d in known), sum(d[1] for d in known)
            run_time = round(counted_time * scale)
            points.append(Point('program.run_time', COUNT, run_time, tags))
            points.append(Point('program.run_count', COUNT, round(counted_runs * scale), tags))
            if counted_runs:
                points.append(Point('program.average_run_time', GAUGE, counted_time / counted_runs, tags))
            if interval:
                points.append(Point('program.cpu_usage', GAUGE, 100.0 * counted_time * scale / (interval * 1e9), tags))
        return points

    def _attachment_points(self, members: list[ProgramRecord], tags: tuple[str, ...]) -> list[Point]:
        """How many links attach the series' programs, by attach type and target: the first targets
        by name, the rest as `other` (a program on hundreds of functions or cgroups stays a few series)."""
        links: dict[tuple[str, str | None], int] = {}
        for p in members:
            for a in p.attachments:
                key = (a.attach_type or a.kind, a.target)
                links[key] = links.get(key, 0) + 1
        if not links:
            return [Point('program.attachments', GAUGE, 0, (*tags, NO_LINK_TAG))]
        counts: dict[tuple[str, ...], int] = {}
        for i, ((kind, target), count) in enumerate(
            sorted(links.items(), key=lambda item: (item[0][0], item[0][1] or ''))
        ):
            where: tuple[str, ...] = (self._tag('attach_type', kind),)
            if target is not None:
                where += (self._tag('attach_target', target if i < MAX_ATTACH_TARGETS else 'other'),)
            counts[where] = counts.get(where, 0) + count
        return [Point('program.attachments', GAUGE, count, (*tags, *where)) for where, count in counts.items()]

    def _map_points(self, groups: dict[tuple[str, ...], list[MapRecord]]) -> list[Point]:
        # Ring buffers are always reported, outside max_maps: a host has few, and one that fills up
        # drops events in whatever tool owns it.
        rings = {tags: members for tags, members in groups.items() if members[0].ring_buffer_used is not None}
        others = {tags: members for tags, members in groups.items() if tags not in rings}
        kept, unreported = self._top(
            others, self.options.max_maps, lambda item: (-sum(m.memory_bytes or 0 for m in item[1]), item[0])
        )
        points = [Point('maps.unreported', GAUGE, unreported, ())]
        for tags, members in [*rings.items(), *kept]:
            points.append(Point('map.instances', GAUGE, len(members), tags))
            points.append(Point('map.max_entries', GAUGE, sum(m.max_entries for m in members), tags))
            if all(m.memory_bytes is not None for m in members):
                points.append(Point('map.memory', GAUGE, sum(m.memory_bytes or 0 for m in members), tags))
            if all(m.entries is not None for m in members):
                points.append(Point('map.entries', GAUGE, sum(m.entries or 0 for m in members), tags))
                # The fullest map is what a "nearly full" alert is about.
                occupancy = max((m.occupancy for m in members if m.occupancy is not None), default=None)
                if occupancy is not None:
                    points.append(Point('map.occupancy', GAUGE, occupancy, tags))
            if tags in rings:
                used = [m for m in members if m.ring_buffer_used is not None]
                points.append(Point('map.ring_buffer.used', GAUGE, sum(m.ring_buffer_used or 0 for m in used), tags))
                points.append(Point('map.ring_buffer.fill', GAUGE, max(m.ring_buffer_fill or 0.0 for m in used), tags))
        return points

    def _charged_memory_points(self, snapshot: EbpfSnapshot) -> list[Point]:
        """The memory of maps charged to each memory cgroup: it counts against that cgroup's limit (5.11+),
        though no process of it shows it. Maps charged to none (the root cgroup's) are left out."""
        charged: dict[int, int] = {}
        for m in snapshot.maps:
            if m.memory_cgroup_id and m.memory_bytes is not None:
                charged[m.memory_cgroup_id] = charged.get(m.memory_cgroup_id, 0) + m.memory_bytes
        totals: dict[tuple[str, ...], int] = {}
        for cgroup_id, memory in charged.items():
            path = snapshot.memory_cgroups.get(cgroup_id)
            if path is None:
                tags: tuple[str, ...] = ('memory_cgroup:not_visible',)  # outside what this process sees
            else:
                container = parse_cgroup_path(path)
                name = path.rsplit('/', 1)[-1] or path
                tags = tuple(cgroup_tags(name, container, self.options.cardinality))
                if container is not None and self.options.container_tags is not None:
                    tags += tuple(self.options.container_tags(container, self.options.cardinality))
            totals[tags] = totals.get(tags, 0) + memory
        return [Point('maps.charged_memory', GAUGE, memory, tags) for tags, memory in sorted(totals.items())]
