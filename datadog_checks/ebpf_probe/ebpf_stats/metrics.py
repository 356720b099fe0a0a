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
goes between runs never makes a series jump).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from datadog_checks.ebpf_probe.formatting import tag

from .records import EbpfSnapshot, MapRecord, Owner, ProgramRecord

GAUGE = 'gauge'
COUNT = 'count'
SELF_TAG = 'ebpf_probe_self:true'


@dataclass(frozen=True)
class Point:
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
    max_programs: int = 500
    max_maps: int = 500
    run_time: bool = True


def owner_label(owners: Sequence[Owner], pinned: bool) -> str:
    """Who holds an object: the process that does (lowest pid first), else 'pinned' (bpffs) or 'kernel'."""
    if owners:
        return min(owners).comm  # Owner orders by pid first
    return 'pinned' if pinned else 'kernel'


@dataclass
class _Group:
    tags: tuple[str, ...]
    members: list = field(default_factory=list)


class StatsMetrics:
    """Turns successive snapshots into points, keeping what it needs between runs (program counters)."""

    def __init__(self, options: MetricOptions):
        self.options = options
        self._previous: dict[int, tuple[int, int, int]] = {}  # program id -> run_time_ns, run_count, misses
        self._previous_time: float | None = None

    def _is_own(self, owners: Sequence[Owner]) -> bool:
        return any(o.pid == self.options.own_pid for o in owners)

    def _base_tags(self, owners: Sequence[Owner], pinned: bool) -> list[str]:
        tags = [tag('owner', owner_label(owners, pinned))]
        if self._is_own(owners):
            tags.append(SELF_TAG)
        return tags

    def points(self, snapshot: EbpfSnapshot) -> list[Point]:
        interval = None if self._previous_time is None else snapshot.timestamp - self._previous_time
        deltas = self._deltas(snapshot.programs)
        self._previous_time = snapshot.timestamp
        points: list[Point] = []
        points += self._totals('programs', 'program_type', snapshot.programs)
        points += self._totals('maps', 'map_type', snapshot.maps)
        points += self._program_points(snapshot.programs, deltas, interval, snapshot.run_time_stats)
        points += self._map_points(snapshot.maps)
        return points

    def _deltas(self, programs: list[ProgramRecord]) -> dict[int, tuple[int, int, int]]:
        deltas = {}
        current = {}
        for p in programs:
            now = (p.run_time_ns, p.run_count, p.recursion_misses)
            current[p.id] = now
            before = self._previous.get(p.id)
            if before is not None:
                # A counter going backwards (reset) counts as no progress, never negative.
                deltas[p.id] = (max(0, now[0] - before[0]), max(0, now[1] - before[1]), max(0, now[2] - before[2]))
        self._previous = current
        return deltas

    def _totals(self, kind: str, type_key: str, records: Sequence[ProgramRecord] | Sequence[MapRecord]) -> list[Point]:
        totals: dict[tuple[str, ...], list[int]] = {}
        for r in records:
            tags = (tag(type_key, r.type), *self._base_tags(r.owners, r.pinned))
            total = totals.setdefault(tags, [0, 0])
            total[0] += 1
            total[1] += r.memory_bytes or 0
        points = []
        for tags, (count, memory) in sorted(totals.items()):
            points.append(Point(f'{kind}.total', GAUGE, count, tags))
            points.append(Point(f'{kind}.memory', GAUGE, memory, tags))
        return points

    def _reported(self, records, patterns: NamePatterns):
        return [
            r
            for r in records
            if patterns.allows(r.name) and not (self.options.exclude_own_objects and self._is_own(r.owners))
        ]

    def _group(self, records, name_key: str, type_key: str) -> list[_Group]:
        groups: dict[tuple[str, ...], _Group] = {}
        for r in records:
            name_tag, type_tag = tag(name_key, r.name), tag(type_key, r.type)
            tags = (name_tag, type_tag, *self._base_tags(r.owners, r.pinned))
            groups.setdefault(tags, _Group(tags)).members.append(r)
        return list(groups.values())

    def _program_points(
        self,
        programs: list[ProgramRecord],
        deltas: dict[int, tuple[int, int, int]],
        interval: float | None,
        run_time_stats: bool,
    ) -> list[Point]:
        reported = self._reported(programs, self.options.programs)
        groups = self._group(reported, 'program_name', 'program_type')

        def cost(group: _Group) -> tuple:
            run_time = sum(deltas.get(p.id, (0, 0, 0))[0] for p in group.members)
            return (-run_time, -sum(p.memory_bytes or 0 for p in group.members), group.tags)

        groups.sort(key=cost)
        kept = groups[: self.options.max_programs]
        unreported = sum(len(g.members) for g in groups[self.options.max_programs :])
        points = [Point('programs.unreported', GAUGE, unreported, ())]
        with_run_time = self.options.run_time and run_time_stats
        for group in kept:
            members: list[ProgramRecord] = group.members
            tags = group.tags
            points.append(Point('program.instances', GAUGE, len(members), tags))
            points.append(Point('program.translated_size', GAUGE, sum(p.translated_bytes for p in members), tags))
            points.append(Point('program.jited_size', GAUGE, sum(p.jited_bytes for p in members), tags))
            points.append(
                Point('program.verified_instructions', GAUGE, sum(p.verified_instructions for p in members), tags)
            )
            if all(p.memory_bytes is not None for p in members):
                points.append(Point('program.memory', GAUGE, sum(p.memory_bytes or 0 for p in members), tags))
            if not with_run_time:
                continue
            known = [deltas[p.id] for p in members if p.id in deltas]
            if not known:
                continue  # first sight of these programs: nothing to compare with yet
            run_time, run_count, misses = (sum(d[i] for d in known) for i in range(3))
            points.append(Point('program.run_time', COUNT, run_time, tags))
            points.append(Point('program.run_count', COUNT, run_count, tags))
            points.append(Point('program.recursion_misses', COUNT, misses, tags))
            if run_count:
                points.append(Point('program.average_run_time', GAUGE, run_time / run_count, tags))
            if interval:
                points.append(Point('program.cpu_usage', GAUGE, 100.0 * run_time / (interval * 1e9), tags))
        return points

    def _map_points(self, maps: list[MapRecord]) -> list[Point]:
        reported = self._reported(maps, self.options.maps)
        groups = self._group(reported, 'map_name', 'map_type')
        groups.sort(key=lambda g: (-sum(m.memory_bytes or 0 for m in g.members), g.tags))
        kept = groups[: self.options.max_maps]
        unreported = sum(len(g.members) for g in groups[self.options.max_maps :])
        points = [Point('maps.unreported', GAUGE, unreported, ())]
        for group in kept:
            members: list[MapRecord] = group.members
            tags = group.tags
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
        return points
