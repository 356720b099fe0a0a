# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The eBPF stats probe: every program and map on the host, with owners and entry counts.

Same life cycle as the OOM-kill probe: a factory loads it (its BPF iterators, CO-RE),
snapshot() returns typed records, close() releases everything, including the thread that turns
run-time statistics on for a window of each interval.

What a run costs, and why it stays small on busy hosts:
- the inventory: one pass of an iter/bpf_prog and of an iter/bpf_map program gives every
  object's fields and the hash maps' entry counts (bpf_map_sum_elem_count, 6.6+), with no file
  descriptor per object; object by object (bpftool's way) only where the kernel lacks them
  (inventory.py, entries.py);
- owners: the walk of every file descriptor of every process is made only when an object is new,
  a holder exited or references to an object changed (owners.py);
- run time: statistics are on for a share of each interval only, and the figures scaled
  (runtime.py); links are read for kprobe misses (links.py).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

from datadog_checks.ebpf_probe.kernel import libbpf, requirements
from datadog_checks.ebpf_probe.kernel.btf import Btf, has_vmlinux_btf, set_rodata
from datadog_checks.ebpf_probe.kernel.cgroups import CgroupPaths, memory_hierarchy
from datadog_checks.ebpf_probe.kernel.features import in_host_pid_namespace, kprobe_support
from datadog_checks.ebpf_probe.kernel.requirements import RequirementError
from datadog_checks.ebpf_probe.resources import bpf_file

from .entries import FOR_EACH, PER_MAP_ITERATOR, EntryCounter, Walk
from .inventory import Inventory
from .links import Links, kernel_counts_kprobe_misses
from .owners import (
    OWNED_LINK,
    OWNED_MAP,
    OWNED_PROG,
    OwnerTracker,
    PinnedObjects,
    owner_records_from_iterator,
    owner_records_from_proc,
)
from .records import EbpfSnapshot, MapRecord, Owner, ProgramRecord, RunTimeCoverage
from .runtime import Counters, HeldStats, RunTimeSampler

STATS_OBJECT = 'ebpf_stats.bpf.o'
MAP_COUNT_OBJECT = 'map_count.bpf.o'
# The programs of STATS_OBJECT, and the hooks the probe shows them by.
ITERATORS = {
    'list_programs': 'iter/bpf_prog',
    'program_stats': 'iter/bpf_prog',
    'list_maps_count': 'iter/bpf_map',
    'list_maps': 'iter/bpf_map',
    'map_elements': 'iter/bpf_map_elem',
    'bpf_owners': 'iter/task_file',
}
# What a program the kernel refuses costs (the probe falls back to what the kernel still allows).
REFUSAL_COSTS = {
    'list_programs': 'programs are read object by object',
    'program_stats': 'run-time counters are read program by program',
    'list_maps_count': 'hash maps are counted map by map',
    'list_maps': 'maps are read object by object',
    'map_elements': 'hash maps are counted by batch lookups or one by one',
    'bpf_owners': 'owners are read from /proc',
}
MAX_CPUS = 1024  # bpf/ebpf_stats.bpf.c: the CPUs whose run-time counters the iterator sums
DEFAULT_SAMPLED_FRACTION = 0.05
DEFAULT_INTERVAL = 15.0


@dataclass(frozen=True)
class EbpfStatsOptions:
    collect_program_runtime: bool = True
    # Share of each interval run-time statistics are on (the rest is scaled); 1: always on, exact.
    runtime_sampling: float = DEFAULT_SAMPLED_FRACTION
    interval: float = DEFAULT_INTERVAL  # seconds between snapshots expected (the check's min_collection_interval)


# Programs (of ITERATORS, and 'map_count') never loaded: not an option, a seam for the tests and
# benchmarks that exercise the fallbacks (they monkeypatch it).
WITHHELD_ITERATORS: frozenset[str] = frozenset()
WITHHELD = 'withheld (a test of the fallbacks)'


def contiguous_possible_cpus(path: str = '/sys/devices/system/cpu/possible') -> int | None:
    """n when the possible CPUs are 0..n-1 (the iterator sums counters over those), else None."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    low, _, high = text.partition('-')
    if ',' in text or not low.isdigit() or int(low) != 0:
        return None
    return int(high or low) + 1


class EbpfStatsProbe:
    """Every eBPF program and map of the host. Needs CAP_SYS_ADMIN (listing objects by id)."""

    variant = 'co-re'

    def __init__(self, options: EbpfStatsOptions, log: logging.Logger | logging.LoggerAdapter):
        self._options = options
        self._log = log
        self._lock = threading.Lock()
        self._obj: libbpf.BpfObject | None = None
        self._iters: dict[str, libbpf.Link] = {}
        self._run_time: HeldStats | RunTimeSampler | None = None
        self.hooks: list[str] = []
        self.rejected_hooks: dict[str, str] = {}
        # What works in a degraded way, said once by the check (some are learnt while running).
        self.limitations: list[str] = []
        self._counter = EntryCounter({}, {})
        self._for_each_unavailable = ''  # why bpf_for_each_map_elem cannot count here
        self._nr_cpus = 0  # CPUs whose run-time counters the program iterator sums; 0: read per program
        self._inventory = Inventory(self._counter)
        self._links = Links(count_misses=False)
        self._cgroups = CgroupPaths(memory_hierarchy())
        self._owners = OwnerTracker(self._scan_owners, os.getpid(), log)
        self._run_time_error_said = False
        self._run_time_source: str | None = None  # how the last snapshot's run time was counted (RunTimeCoverage)

    @classmethod
    def load(cls, options: EbpfStatsOptions, log: logging.Logger | logging.LoggerAdapter) -> EbpfStatsProbe:
        caps = requirements.effective_capabilities()
        if not caps & (1 << requirements.CAP_SYS_ADMIN):
            raise RequirementError(
                'missing capability CAP_SYS_ADMIN: listing every eBPF program and map on the host needs it '
                '(the kernel allows BPF_*_GET_NEXT_ID only with CAP_SYS_ADMIN): grant it, or set '
                'collect_ebpf_stats: false to collect OOM kills only'
            )
        probe = cls(options, log)
        try:
            probe._load()
        except BaseException:
            probe.close()
            raise
        return probe

    def _load(self) -> None:
        if not in_host_pid_namespace():
            self.limitations.append(
                "the check is not in the host's pid namespace (Kubernetes: hostPID: true): holders are named by "
                "their pids on the host, and a holder's exit is noticed by its objects' reference counts"
            )
        available = self._iterator_plan()
        path = bpf_file(STATS_OBJECT)
        if any(available.values()) and not path.exists():
            self.limitations.append(f'the BPF iterators are not loaded: {path} is missing (build it with make bpf)')
            available = dict.fromkeys(available, False)
        wanted = self._load_iterators(available)
        walks: dict[str, Walk] = {}
        unavailable: dict[str, str] = {}
        if wanted['map_elements']:
            walks[PER_MAP_ITERATOR] = self._walk_elements
        elif not wanted['list_maps_count']:  # with the kfunc, no map needs walking
            unavailable[PER_MAP_ITERATOR] = self.rejected_hooks.get(ITERATORS['map_elements'], 'not loaded')
        if self._for_each_unavailable:
            unavailable[FOR_EACH] = self._for_each_unavailable
        else:
            walks[FOR_EACH] = self._walk_for_each
        self._counter = EntryCounter(walks, unavailable)
        iters = self._iters
        self._inventory = Inventory(
            self._counter,
            iters.get('list_programs'),
            iters.get('list_maps_count') or iters.get('list_maps'),
            iters.get('program_stats') if self._nr_cpus else None,
            run_counters=self._options.collect_program_runtime,
        )
        if self._options.collect_program_runtime:
            self._start_run_time()

    @staticmethod
    def _chosen(available: dict[str, bool]) -> dict[str, bool]:
        """The programs to load of those available: with the counting kfunc, no other way to count maps."""
        wanted = dict(available)
        if wanted['list_maps_count']:
            wanted['list_maps'] = wanted['map_elements'] = False
        return wanted

    def _load_iterators(self, available: dict[str, bool]) -> dict[str, bool]:
        """Load the iterator programs chosen; one the kernel refuses costs only what needs it.

        The whole object is loaded at once; only if the kernel refuses it is each program tried
        alone, to learn which ones it refuses (a security policy or a hardened build may refuse one
        program type), and the object loaded again without them and with their stand-ins.
        """
        refused: dict[str, str] = {}
        while True:
            wanted = self._chosen({p: ok and p not in refused for p, ok in available.items()})
            programs = [p for p, want in wanted.items() if want]
            if not programs:
                break
            try:
                self._load_object(programs)
                break
            except (libbpf.LibbpfError, OSError) as e:
                self._log.debug('eBPF stats iterators failed to load', exc_info=True)
                self._close_object()
                # Refused together but not alone (memory, say): none of them, for that reason.
                refused.update(self._refused_alone(programs) or dict.fromkeys(programs, str(e)))
        if available['list_maps_count'] and 'list_maps_count' not in refused:
            self.rejected_hooks.setdefault(
                ITERATORS['map_elements'], 'not needed: the kernel counts every map in one pass'
            )
        self._say_refused(refused, wanted)
        self.hooks += sorted({ITERATORS[p] for p, want in wanted.items() if want}, key=list(ITERATORS.values()).index)
        if wanted['list_maps_count']:
            self.hooks.append('bpf_map_sum_elem_count')
        return wanted

    def _load_object(self, programs: list[str]) -> None:
        """Load STATS_OBJECT with these programs only and attach its iterators (map_elements: per map)."""
        obj = libbpf.BpfObject(str(bpf_file(STATS_OBJECT)))
        self._obj = obj
        for program in ITERATORS:
            obj.set_autoload(program, program in programs)
        set_rodata(obj, {'nr_cpus': struct.pack('<I', self._nr_cpus)})
        obj.load()
        self._iters = {program: obj.attach_iter(program) for program in programs if program != 'map_elements'}

    def _refused_alone(self, programs: list[str]) -> dict[str, str]:
        """program -> the kernel's refusal, for those of `programs` that do not load even alone."""
        refused = {}
        for program in programs:
            try:
                self._load_object([program])
            except (libbpf.LibbpfError, OSError) as e:
                refused[program] = str(e)
            finally:
                self._close_object()
        return refused

    def _say_refused(self, refused: dict[str, str], loaded: dict[str, bool]) -> None:
        """Each refusal, named with the kernel's errno and what it costs."""
        if refused and not any(loaded.values()):
            errors = sorted(set(refused.values()))
            self.limitations.append(
                f'the BPF iterators could not be loaded ({"; ".join(errors)}): programs and maps are read object by '
                'object, map entries counted map by map and owners read from /proc'
            )
        for program, error in refused.items():
            hook = ITERATORS[program]
            self.rejected_hooks[hook] = f'refused by the kernel: {error}'
            if program == 'list_maps_count':
                self.rejected_hooks['bpf_map_sum_elem_count'] = f'refused by the kernel: {error}'
            if any(loaded.values()):
                self.limitations.append(
                    f'the kernel refused the {hook} program {program} ({error}): {REFUSAL_COSTS[program]}'
                )

    def _start_run_time(self) -> None:
        fraction = self._options.runtime_sampling
        try:
            if fraction >= 1:
                self._run_time = HeldStats()
                self.hooks.insert(0, 'BPF_ENABLE_STATS')
            else:
                os.close(libbpf.enable_stats())  # refused now rather than in the thread, later
                self._run_time = RunTimeSampler(
                    fraction, self._options.interval, self._inventory.run_counters, self._log
                )
                self.hooks.insert(0, f'BPF_ENABLE_STATS {fraction * 100:g}% of the time')
        except libbpf.LibbpfError as e:
            self.limitations.append(f'program run time is not collected: BPF_ENABLE_STATS failed: {e}')

    def _walk_elements(self, fd: int) -> int:
        assert self._obj is not None
        return struct.unpack('<Q', self._obj.read_map_iterator('map_elements', fd))[0]

    @staticmethod
    def _walk_for_each(fd: int) -> int:
        """bpf_for_each_map_elem over one map: a program loaded for it, run once, freed."""
        obj = libbpf.BpfObject(str(bpf_file(MAP_COUNT_OBJECT)))
        try:
            obj.map('count_target').reuse_fd(fd)
            obj.load()
            return libbpf.prog_test_run(obj.program_fd('count_with_for_each'))
        finally:
            obj.close()

    def _iterator_plan(self) -> dict[str, bool]:
        """Which iterator programs the kernel offers: program -> available (_chosen() picks the ones to
        load). Also what the kernel lacks, said once."""
        wanted = dict.fromkeys(ITERATORS, False)
        disabled = WITHHELD_ITERATORS

        def reject(hook: str, why: str) -> None:
            self.rejected_hooks.setdefault(hook, why)

        if not has_vmlinux_btf():
            self._for_each_unavailable = 'the kernel has no BTF to tell whether it has bpf_for_each_map_elem'
            for hook in ITERATORS.values():
                reject(hook, 'the kernel has no BTF')
            self.limitations.append(
                'the kernel has no BTF: programs and maps are read object by object, map entries counted map by '
                'map and owners read from /proc'
            )
            return wanted
        try:
            btf = Btf.open()
        except (OSError, libbpf.LibbpfUnavailable) as e:
            self._for_each_unavailable = f'unreadable BTF: {e}'
            for hook in ITERATORS.values():
                reject(hook, f'unreadable BTF: {e}')
            self.limitations.append(f'the kernel BTF is unreadable ({e}): maps are counted map by map')
            return wanted
        with btf:
            self._plan_inventory(btf, wanted, disabled, reject)
            if 'map_elements' in disabled:
                reject(ITERATORS['map_elements'], WITHHELD)
            elif not btf.has_struct('bpf_iter__bpf_map_elem'):
                reject(ITERATORS['map_elements'], 'the kernel has no map element iterator (5.9+)')
            else:
                wanted['map_elements'] = True
            if not btf.has_function('bpf_for_each_map_elem'):
                self._for_each_unavailable = 'the kernel has no bpf_for_each_map_elem (5.13+)'
            elif 'map_count' in disabled:
                self._for_each_unavailable = WITHHELD
            elif not bpf_file(MAP_COUNT_OBJECT).exists():
                self._for_each_unavailable = f'{bpf_file(MAP_COUNT_OBJECT)} is missing (build it with make bpf)'
            if 'bpf_owners' in disabled:
                reject(ITERATORS['bpf_owners'], WITHHELD)
            elif not btf.has_struct('bpf_iter__task_file'):
                reject(ITERATORS['bpf_owners'], 'the kernel has no task_file iterator (5.8+)')
                self.limitations.append('the kernel has no task_file iterator (5.8+): owners are read from /proc')
            else:
                wanted['bpf_owners'] = True
            self._plan_kprobe_misses(btf)
        return wanted

    def _plan_inventory(self, btf: Btf, wanted: dict[str, bool], disabled: frozenset[str], reject) -> None:
        has_map_iterator = btf.has_struct('bpf_iter__bpf_map')
        if 'list_maps_count' in disabled:
            reject('bpf_map_sum_elem_count', WITHHELD)
        elif not btf.has_function('bpf_map_sum_elem_count'):
            reject('bpf_map_sum_elem_count', 'the kernel has no bpf_map_sum_elem_count kfunc (6.6+)')
            self.limitations.append(
                'the kernel has no bpf_map_sum_elem_count kfunc (6.6+): hash maps are counted map by map'
            )
        elif has_map_iterator:
            wanted['list_maps_count'] = True
        if not has_map_iterator:
            reject(ITERATORS['list_maps'], 'the kernel has no bpf_map iterator (5.8+)')
        elif 'list_maps' in disabled:
            reject(ITERATORS['list_maps'], WITHHELD)
        else:
            wanted['list_maps'] = True
        if 'list_maps' in disabled:  # the object-by-object way, for tests: no map iterator at all
            wanted['list_maps_count'] = wanted['list_maps'] = False
        if not btf.has_struct('bpf_iter__bpf_prog'):
            reject(ITERATORS['list_programs'], 'the kernel has no bpf_prog iterator (5.9+)')
            self.limitations.append('the kernel has no bpf_prog iterator (5.9+): programs are read one by one')
            return
        if 'list_programs' in disabled:
            reject(ITERATORS['list_programs'], WITHHELD)
            return
        wanted['list_programs'] = True
        cpus = contiguous_possible_cpus()
        if not btf.has_function('bpf_map_lookup_percpu_elem'):
            reject('iter/bpf_prog run-time counters', 'the kernel has no bpf_map_lookup_percpu_elem (5.19+)')
        elif cpus is None or cpus > MAX_CPUS:
            reject('iter/bpf_prog run-time counters', f'possible CPUs not 0 to n-1 with n <= {MAX_CPUS}')
        else:
            self._nr_cpus = cpus
            wanted['program_stats'] = True
        if not self._nr_cpus and self._options.collect_program_runtime:
            self.limitations.append(
                'the program iterator cannot read run-time counters here: they are read program by program'
            )

    def _plan_kprobe_misses(self, btf: Btf) -> None:
        has_kprobes, why_not = kprobe_support()
        if not has_kprobes:
            self.rejected_hooks['kprobe misses'] = why_not
        elif not kernel_counts_kprobe_misses(btf):
            self.rejected_hooks['kprobe misses'] = "the kernel's bpf_link_info has no missed counts (6.7+)"
            self.limitations.append(
                "kprobe misses are not reported: the kernel's bpf_link_info has no missed counts (6.7+)"
            )
        else:
            self._links.count_misses = True
            self.hooks.append('bpf_link_info (kprobe misses)')

    @property
    def run_time_stats(self) -> bool:
        """Whether run time is collected (statistics held on, or sampled)."""
        return self._run_time is not None

    @property
    def run_time_source(self) -> str | None:
        """How the last snapshot's run time was counted: held, sampled, sysctl, external (logs, benchmarks)."""
        return self._run_time_source

    # --- collection -------------------------------------------------------------

    def snapshot(self) -> EbpfSnapshot:
        """Every program and map in the kernel now, with owners and entry counts."""
        with self._lock:
            # Links first: counting a map without the kfunc attaches a link to it for a moment, and a
            # link's id lingers until the kernel's deferred free: listed now, it would look new.
            link_ids, kprobe_misses, attached = self._links.scan()
            programs, program_refcounts, timestamp, run_time = self._read_programs()
            maps, map_refcounts = self._inventory.maps()
            objects = {OWNED_PROG: {p.id for p in programs}, OWNED_MAP: {m.id for m in maps}, OWNED_LINK: link_ids}
            refcounts = {}
            if program_refcounts is not None and map_refcounts is not None:
                # A map counted by a bpf_for_each_map_elem program (large maps, before 6.6) was referenced
                # by that program, whose references the kernel drops an RCU grace period after it is
                # freed: its count says nothing of its holders here. Their changes show by new objects
                # and holders' exits instead. (The element iterator's link lets go of it at once.)
                walked = {m.id for m in maps if m.entries_method == FOR_EACH}
                if walked:
                    map_refcounts = {i: count for i, count in map_refcounts.items() if i not in walked}
                refcounts = {OWNED_PROG: program_refcounts, OWNED_MAP: map_refcounts}
            holders, pinned = self._owners.owners(objects, refcounts)
            self._attach_owners(programs, maps, holders, pinned, kprobe_misses)
            for program in programs:
                program.attachments = tuple(attached.get(program.id, ()))
            for limitation in self._counter.unavailable():
                if limitation not in self.limitations:
                    self.limitations.append(limitation)
            self._say_run_time_error()
            if run_time is not None and run_time.source != self._run_time_source:
                self._log.debug('Program run time counted: %s', run_time.source)
                self._run_time_source = run_time.source
            cgroups = {m.memory_cgroup_id for m in maps if m.memory_cgroup_id}
            for objects_held in (programs, maps):
                cgroups.update(o.memory_cgroup_id for r in objects_held for o in r.owners if o.memory_cgroup_id)
            return EbpfSnapshot(timestamp, programs, maps, run_time, self._cgroups.paths(cgroups))

    def _read_programs(self) -> tuple[list[ProgramRecord], dict[int, int] | None, float, RunTimeCoverage | None]:
        """The programs, read in order with the statistics windows; and how much of the interval they counted."""

        def read() -> tuple[tuple[list[ProgramRecord], dict[int, int] | None, float], Counters]:
            programs, refcounts = self._inventory.programs()
            counters = {p.id: (p.run_time_ns, p.run_count) for p in programs}
            return (programs, refcounts, time.monotonic()), counters

        if self._run_time is None:
            (programs, refcounts, timestamp), _ = read()
            return programs, refcounts, timestamp, None
        (programs, refcounts, timestamp), coverage = self._run_time.observe(read)
        return programs, refcounts, timestamp, coverage

    def _say_run_time_error(self) -> None:
        error = getattr(self._run_time, 'error', None)
        if error and not self._run_time_error_said:
            self._run_time_error_said = True
            self.limitations.append(f'program run time stopped: {error}')

    @staticmethod
    def _attach_owners(
        programs: list[ProgramRecord],
        maps: list[MapRecord],
        holders: dict[int, dict[int, tuple[Owner, ...]]],
        pinned: PinnedObjects,
        kprobe_misses: dict[int, int],
    ) -> None:
        program_holders, map_holders = holders.get(OWNED_PROG, {}), holders.get(OWNED_MAP, {})
        for program in programs:
            program.owners = program_holders.get(program.id, ())
            program.pinned = not program.owners and (OWNED_PROG, program.id) in pinned
            program.kprobe_misses = kprobe_misses.get(program.id)
        users: dict[int, set[Owner]] | None = None
        for bpf_map in maps:
            owners = map_holders.get(bpf_map.id, ())
            if not owners:
                # A map nobody holds an fd to belongs to whoever holds the programs that use it.
                if users is None:
                    users = {}
                    for program in programs:
                        for map_id in program.map_ids:
                            users.setdefault(map_id, set()).update(program.owners)
                owners = tuple(sorted(users.get(bpf_map.id, ())))
            bpf_map.owners = owners
            bpf_map.pinned = not owners and (OWNED_MAP, bpf_map.id) in pinned

    def _scan_owners(self):
        owner_iter = self._iters.get('bpf_owners')
        if owner_iter is not None:
            return owner_records_from_iterator(libbpf.read_iterator(owner_iter))
        return owner_records_from_proc()

    # --- life cycle ------------------------------------------------------------

    def _close_object(self) -> None:
        self._iters = {}
        if self._obj is not None:
            self._obj.close()  # destroys the iterator links too
            self._obj = None

    def close(self) -> None:
        run_time, self._run_time = self._run_time, None
        if run_time is not None:
            run_time.close()  # stops the sampler's thread first: it reads through the iterators
        with self._lock:
            self._close_object()
            self._owners.close()
