# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The record the BPF side writes for each OOM kill (bpf/oom_kill.h), and what it means.

Pure decoding: bytes in, an OOMKill out. The only outside knowledge is a kernel symbol
table, to tell from the trigger's stack whether a memory cgroup or the system ran out.
"""

from __future__ import annotations

import resource
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

COMM_LEN = 16
# The kernel's page size in kB: 4 on x86-64, 4, 16 or 64 on arm64 (the kernel's build chooses).
PAGE_KB = max(1, resource.getpagesize() // 1024)
CGROUP_MAX_DEPTH = 8
CGROUP_NAME_LEN = 128
STACK_DEPTH = 20
MEMCG_EVENTS = 6
# memory.events, as the file names them, in the record's order.
MEMCG_EVENT_NAMES = ('low', 'high', 'max', 'oom', 'oom_kill', 'oom_group_kill')
SIGKILL, SIGTERM = 9, 15
SIGNAL_NAMES = {SIGKILL: 'SIGKILL', SIGTERM: 'SIGTERM'}
PSI_FIXED_1 = 2048  # the kernel's fixed point for pressure averages: 100%
# A memory cgroup's limit at least this large is none (memory.max "max": the page counter's maximum).
NO_LIMIT_KB = 1 << 50

# record.hook: which hook wrote it (OOM_HOOK_* in oom_kill.h; names in hooks.py).
HOOK_TP_BTF = 1
HOOK_KPROBE = 2
HOOK_TRACEPOINT = 3
HOOK_RAW_TP = 4
HOOK_KILL_KPROBE = 5
HOOK_SIGNAL = 6
HOOK_SIGNAL_RAW_TP = 7
SIGNAL_HOOKS = frozenset({HOOK_SIGNAL, HOOK_SIGNAL_RAW_TP})
# dropped_kills' slots (OOM_DROPPED_* in oom_kill.h): the kernel's kills, kill signals.
DROPPED_KERNEL, DROPPED_SIGNAL = 0, 1

# record.flags (OOM_F_* in oom_kill.h)
F_MEMCG = 1 << 0
F_CONSTRAINT_KNOWN = 1 << 1
F_VICTIM_TASK = 1 << 2
F_MEMORY = 1 << 3
F_OOM_CONTROL = 1 << 4
F_CGROUP = 1 << 5
F_CGROUP_NAME_TRUNCATED = 1 << 6
F_CHOSEN = 1 << 7
F_CGROUP_DEPTH_TRUNCATED = 1 << 8
F_VICTIM_PID_UNKNOWN = 1 << 9
F_DOMAIN = 1 << 10
F_DOMAIN_GUESSED = 1 << 11
F_PID_NS = 1 << 12
F_PARENT = 1 << 13
F_OLDEST_CHILD = 1 << 14
F_MEMCG_STATE = 1 << 15
F_PSI = 1 << 16
F_OOM_GROUP_KILL_EVENT = 1 << 17

# struct oom_kill_record, field by field, in order (a test compares each offset with the
# compiled object's BTF).
RECORD_FIELDS: tuple[tuple[str, str], ...] = (
    ('timestamp_ns', 'Q'),
    ('total_vm_kb', 'Q'),
    ('anon_rss_kb', 'Q'),
    ('file_rss_kb', 'Q'),
    ('shmem_rss_kb', 'Q'),
    ('pgtables_kb', 'Q'),
    ('oom_domain_pages', 'Q'),
    ('badness_points', 'q'),
    ('cgroup_id', 'Q'),
    ('domain_usage_pages', 'Q'),
    ('domain_limit_pages', 'Q'),
    ('victim_start_time', 'Q'),
    ('memcg_events', f'{MEMCG_EVENTS}Q'),
    ('victim_pid', 'I'),
    ('victim_tid', 'I'),
    ('victim_uid', 'I'),
    ('trigger_pid', 'I'),
    ('trigger_tid', 'I'),
    ('flags', 'I'),
    ('victim_ns_pid', 'I'),
    ('parent_pid', 'I'),
    ('parent_ns_pid', 'I'),
    ('psi_memory_some_avg10', 'I'),
    ('psi_memory_full_avg10', 'I'),
    ('oom_score_adj', 'h'),
    ('hook', 'B'),
    ('cgroup_depth', 'B'),
    ('cgroup_level', 'B'),
    ('domain_level', 'B'),
    ('group_level', 'B'),
    ('pid_ns_level', 'B'),
    ('signal', 'B'),
    ('_pad', '7x'),
    ('kernel_stack_depth', 'I'),
    ('victim_comm', f'{COMM_LEN}s'),
    ('trigger_comm', f'{COMM_LEN}s'),
    ('parent_comm', f'{COMM_LEN}s'),
    ('kernel_stack', f'{STACK_DEPTH}Q'),
    ('cgroup_names', f'{CGROUP_MAX_DEPTH * CGROUP_NAME_LEN}s'),
)
RECORD = struct.Struct('<' + ''.join(layout for _name, layout in RECORD_FIELDS))


# Functions whose presence on the trigger's kernel stack means a memory cgroup,
# not the whole system, ran out of memory (names vary across kernel versions).
MEMCG_OOM_FUNCTIONS = frozenset(
    {'mem_cgroup_out_of_memory', 'mem_cgroup_oom', 'mem_cgroup_oom_synchronize', 'try_charge_memcg', 'try_charge'}
)
# The OOM killer's entry points: on the stack without the above, the system was out of memory.
SYSTEM_OOM_FUNCTIONS = frozenset({'out_of_memory', '__alloc_pages_may_oom', 'pagefault_out_of_memory'})


class SymbolTable(Protocol):
    def find(self, address: int) -> str | None: ...


@dataclass(frozen=True)
class VictimMemory:
    """The victim's memory when it was chosen, in kB (as the kernel's OOM report prints it)."""

    total_vm_kb: int
    anon_rss_kb: int
    file_rss_kb: int
    shmem_rss_kb: int
    pgtables_kb: int

    @property
    def rss_kb(self) -> int:
        return self.anon_rss_kb + self.file_rss_kb + self.shmem_rss_kb


@dataclass(frozen=True)
class CgroupMemory:
    """The victim's memory cgroup when a kill signal was sent to it (often gone by the next run)."""

    level: int  # depth below the hierarchy's root
    usage_kb: int
    limit_kb: int
    events: dict[str, int]  # memory.events: low, high, max, oom, oom_kill (oom_group_kill from 5.17)
    # Memory pressure (PSI), the 10 s averages in percent, as memory.pressure shows them; None where
    # the kernel keeps none for the cgroup.
    pressure_some_avg10: float | None
    pressure_full_avg10: float | None


@dataclass(frozen=True)
class KillSignal:
    """A kill signal sent from user space: the sender is the record's trigger."""

    number: int  # SIGKILL or SIGTERM
    victim_start_time_ns: int  # the victim's start time since boot (suspend counted), as /proc/PID/stat's
    cgroup_memory: CgroupMemory | None
    after_sigterm: bool = False  # a SIGKILL the same killer sent after a SIGTERM (one kill, both said)

    @property
    def name(self) -> str:
        return SIGNAL_NAMES.get(self.number, str(self.number))


@dataclass(frozen=True)
class OOMDomain:
    """The memory cgroup that hit its limit (the victim's, or an ancestor of it), when the victim was chosen."""

    cgroup_path: str | None  # None when its level is above the levels the record keeps
    level: int  # depth below the hierarchy's root
    usage_kb: int
    limit_kb: int
    guessed: bool  # found as the one left without room (no oom_control on this hook)


# Minimal inits: as a container's pid 1 they start one child, the application, and exit when it
# does (`docker run --init` runs tini as docker-init, `podman run --init` catatonit as podman-init).
MINIMAL_INITS = frozenset({'tini', 'tini-static', 'docker-init', 'dumb-init', 'catatonit', 'podman-init'})

# What the victim was to its container (its pid namespace), and whether that made it the container's
# main process (whose death stops the container): True, False, or None when that is not known.
PID_1 = 'pid_1'  # its namespace's init: the kernel ends the whole namespace with it
CHILD_OF_MINIMAL_INIT = 'child_of_minimal_init'  # the one child a minimal init started and exits with
ADOPTED_BY_MINIMAL_INIT = 'adopted_by_minimal_init'  # an orphan the minimal init reaps, not its child
CHILD_OF_PID_1 = 'child_of_pid_1'  # another init's child: whether that init exits with it is its own choice
DESCENDANT = 'descendant'  # a child of another process of the namespace
ENTERED = 'entered'  # its parent is outside the namespace: run with exec, or a shared pid namespace's main
UNKNOWN = 'unknown'  # its parent could not be read
CONTAINER_ROLES: dict[str, bool | None] = {
    PID_1: True,
    CHILD_OF_MINIMAL_INIT: True,
    ADOPTED_BY_MINIMAL_INIT: False,
    CHILD_OF_PID_1: None,
    DESCENDANT: False,
    ENTERED: None,
    UNKNOWN: None,
}


@dataclass(frozen=True)
class Parent:
    """The victim's parent when it was killed (the process that adopted it, if its parent had exited)."""

    pid: int  # the host's
    comm: str
    ns_pid: int | None  # in the victim's pid namespace; None: outside it
    oldest_child: bool  # the victim was the oldest of its living children


@dataclass(frozen=True)
class OOMKill:
    """One OOM kill, as the kernel saw it."""

    timestamp: float  # Unix time of the kill
    victim_pid: int | None  # None: the hook named only the thread (the classic tracepoint)
    victim_tid: int
    victim_comm: str | None
    victim_uid: int | None
    oom_score_adj: int | None
    trigger_pid: int
    trigger_tid: int
    trigger_comm: str
    # True: a memory cgroup hit its limit; False: the whole system ran out; None: unknown.
    memcg_oom: bool | None
    # The victim's memory cgroup, read in the kernel at kill time, e.g. '/kubepods/burstable/pod.../<id>';
    # '/...' in front when it has more levels than the record keeps.
    cgroup_path: str | None
    cgroup_id: int | None  # the cgroup directory's inode number
    cgroup_path_truncated: bool  # levels, or characters of a level's name, left out
    memory: VictimMemory | None
    # Only from the oom_kill_process hook: the OOM domain's size in pages and the
    # victim's badness points in it (the kernel's ranking, not /proc/PID/oom_score).
    oom_domain_pages: int | None
    badness_points: int | None
    hook: str
    # The memory cgroup that ran out; None for a system OOM or when the hook cannot tell.
    domain: OOMDomain | None = None
    # The cgroup killed as a whole (memory.oom.group) with this victim, or None.
    group_cgroup_path: str | None = None
    chosen: bool = True  # the victim the OOM killer chose; False for the other members of a group kill
    # The victim's pid in its own pid namespace and that namespace's depth (0: the host's).
    ns_pid: int | None = None
    pid_ns_level: int | None = None
    parent: Parent | None = None
    # A kill signal from user space (the trigger sent it), not the kernel's OOM killer.
    signal: KillSignal | None = None

    @property
    def trigger_type(self) -> str:
        if self.memcg_oom is None:
            return 'unknown'
        return 'cgroup' if self.memcg_oom else 'system'

    @property
    def container_role(self) -> str | None:
        """What the victim was to the pid namespace it ran in (one of CONTAINER_ROLES); None in the host's."""
        if self.ns_pid is None or not self.pid_ns_level:
            return None
        if self.ns_pid == 1:
            return PID_1
        parent = self.parent
        if parent is None:
            return UNKNOWN
        if parent.ns_pid is None:
            return ENTERED
        if parent.ns_pid != 1:
            return DESCENDANT
        if parent.comm not in MINIMAL_INITS:
            return CHILD_OF_PID_1
        # A minimal init starts its child first; orphans it adopts join its children after it.
        return CHILD_OF_MINIMAL_INIT if parent.oldest_child else ADOPTED_BY_MINIMAL_INIT

    @property
    def container_main_process(self) -> bool | None:
        """Whether the victim's death stopped its container; None when not in one, or not known."""
        role = self.container_role
        return None if role is None else CONTAINER_ROLES[role]

    @property
    def cgroup_name(self) -> str | None:
        """Leaf of the cgroup path ('/' for the root)."""
        if self.cgroup_path is None:
            return None
        return self.cgroup_path.rstrip('/').rsplit('/', 1)[-1] or '/'


@dataclass
class FlushResult:
    kills: list[OOMKill] = field(default_factory=list)  # by the kernel's OOM killer
    # Kill signals from user space, as records: user_space.SignalKills makes kills of them.
    signals: list[OOMKill] = field(default_factory=list)
    dropped: int = 0  # the kernel's kills the kernel side had no room for since the last flush
    signals_dropped: int = 0  # and kill signals
    # Records that could not be decoded (each costs only itself), and the first one's error.
    undecodable: int = 0
    decode_error: str | None = None


def _text(raw: bytes) -> str:
    """A NUL-terminated kernel string; bytes that are not UTF-8 stay visible as escapes."""
    return raw.split(b'\0', 1)[0].decode('utf-8', 'backslashreplace')


def memcg_from_stack(stack: tuple[int, ...], symbols: SymbolTable) -> bool | None:
    """Whether the trigger's kernel stack went through the memcg OOM path; None if it cannot tell."""
    names = {symbols.find(ip) for ip in stack}
    if names & MEMCG_OOM_FUNCTIONS:
        return True
    if names & SYSTEM_OOM_FUNCTIONS:
        return False
    return None


def cgroup_levels(names: bytes, depth: int) -> list[str]:
    """The names of the record's cgroup levels, root side first."""
    depth = min(depth, CGROUP_MAX_DEPTH)
    return [_text(names[i * CGROUP_NAME_LEN : (i + 1) * CGROUP_NAME_LEN]) for i in reversed(range(depth))]


def cgroup_path(names: bytes, depth: int, depth_truncated: bool) -> str:
    """'/a/b/c' from the record's names (leaf first), '/...' in front when levels were left out."""
    path = '/' + '/'.join(cgroup_levels(names, depth))
    return '/...' + path if depth_truncated else path


def ancestor_path(names: bytes, depth: int, victim_level: int, level: int) -> str | None:
    """The path of the victim's cgroup's ancestor at `level` (0: the root), None if not kept."""
    if level == 0:
        return '/'
    levels = cgroup_levels(names, depth)
    first = victim_level - len(levels) + 1  # the level of levels[0]
    if not first <= level <= victim_level:
        return None
    return '/' + '/'.join(levels[: level - first + 1])


def decode_record(
    raw: bytes, boot_to_unix: float, symbols: SymbolTable, hook_names: dict[int, str], page_kb: int | None = None
) -> OOMKill:
    page_kb = page_kb or PAGE_KB
    r = _fields(RECORD.unpack_from(raw))
    stack, names = r['kernel_stack'], r['cgroup_names']
    flags = r['flags']
    victim_task = bool(flags & F_VICTIM_TASK)

    if flags & F_CONSTRAINT_KNOWN:
        memcg_oom: bool | None = bool(flags & F_MEMCG)
    else:
        memcg_oom = memcg_from_stack(stack[: min(r['kernel_stack_depth'], STACK_DEPTH)], symbols)

    path = None
    if flags & F_CGROUP:
        path = cgroup_path(names, r['cgroup_depth'], bool(flags & F_CGROUP_DEPTH_TRUNCATED))

    memory = None
    if flags & F_MEMORY:
        memory = VictimMemory(r['total_vm_kb'], r['anon_rss_kb'], r['file_rss_kb'], r['shmem_rss_kb'], r['pgtables_kb'])
    has_oc = bool(flags & F_OOM_CONTROL)
    domain = group = None
    if flags & F_DOMAIN and memcg_oom is not False:  # a guess is no domain when the stack says system
        domain_path = None
        if flags & F_CGROUP:
            domain_path = ancestor_path(names, r['cgroup_depth'], r['cgroup_level'], r['domain_level'])
        domain = OOMDomain(
            cgroup_path=domain_path,
            level=r['domain_level'],
            usage_kb=r['domain_usage_pages'] * page_kb,
            limit_kb=r['domain_limit_pages'] * page_kb,
            guessed=bool(flags & F_DOMAIN_GUESSED),
        )
        if memcg_oom is None and domain.guessed:
            memcg_oom = True  # a cgroup left without room while the OOM killer ran
    if r['group_level'] and flags & F_CGROUP:
        group = ancestor_path(names, r['cgroup_depth'], r['cgroup_level'], r['group_level'])

    return OOMKill(
        timestamp=boot_to_unix + r['timestamp_ns'] / 1e9,
        victim_pid=None if flags & F_VICTIM_PID_UNKNOWN else r['victim_pid'],
        victim_tid=r['victim_tid'],
        victim_comm=_text(r['victim_comm']) if victim_task else None,
        victim_uid=r['victim_uid'] if victim_task else None,
        oom_score_adj=r['oom_score_adj'] if victim_task else None,
        trigger_pid=r['trigger_pid'],
        trigger_tid=r['trigger_tid'],
        trigger_comm=_text(r['trigger_comm']),
        memcg_oom=memcg_oom,
        cgroup_path=path,
        cgroup_id=r['cgroup_id'] if flags & F_CGROUP else None,
        cgroup_path_truncated=bool(flags & (F_CGROUP_NAME_TRUNCATED | F_CGROUP_DEPTH_TRUNCATED)),
        memory=memory,
        oom_domain_pages=r['oom_domain_pages'] if has_oc else None,
        badness_points=r['badness_points'] if has_oc and flags & F_CHOSEN else None,
        hook=hook_names.get(r['hook'], str(r['hook'])),
        domain=domain,
        group_cgroup_path=group,
        chosen=bool(flags & F_CHOSEN) or not has_oc,
        ns_pid=r['victim_ns_pid'] if flags & F_PID_NS else None,
        pid_ns_level=r['pid_ns_level'] if flags & F_PID_NS else None,
        parent=_parent(r) if flags & F_PARENT else None,
        signal=_kill_signal(r, page_kb) if r['hook'] in SIGNAL_HOOKS else None,
    )


def _fields(values: tuple) -> dict:
    """The record's fields by name: arrays as tuples, strings as bytes, padding left out."""
    r, i = {}, 0
    for name, layout in RECORD_FIELDS:
        count, kind = int(layout[:-1] or 1), layout[-1]
        if kind == 'x':
            continue
        if kind == 's' or count == 1:
            r[name], i = values[i], i + 1
        else:
            r[name], i = tuple(values[i : i + count]), i + count
    return r


def _kill_signal(r: dict, page_kb: int) -> KillSignal:
    flags = r['flags']
    memory = None
    if flags & F_MEMCG_STATE:
        kept = MEMCG_EVENTS if flags & F_OOM_GROUP_KILL_EVENT else MEMCG_EVENTS - 1
        psi = bool(flags & F_PSI)
        memory = CgroupMemory(
            level=r['domain_level'],
            usage_kb=r['domain_usage_pages'] * page_kb,
            limit_kb=r['domain_limit_pages'] * page_kb,
            events=dict(zip(MEMCG_EVENT_NAMES[:kept], r['memcg_events'][:kept], strict=True)),
            pressure_some_avg10=_percent(r['psi_memory_some_avg10']) if psi else None,
            pressure_full_avg10=_percent(r['psi_memory_full_avg10']) if psi else None,
        )
    return KillSignal(number=r['signal'], victim_start_time_ns=r['victim_start_time'], cgroup_memory=memory)


def _percent(avg: int) -> float:
    """A pressure average as memory.pressure prints it: percent, two decimals, truncated."""
    whole, fraction = avg >> 11, ((avg & (PSI_FIXED_1 - 1)) * 100) >> 11
    return whole + fraction / 100


def _parent(r: dict) -> Parent:
    return Parent(
        pid=r['parent_pid'],
        comm=_text(r['parent_comm']),
        ns_pid=r['parent_ns_pid'] or None,
        oldest_child=bool(r['flags'] & F_OLDEST_CHILD),
    )


def monotonic_to_unix() -> float:
    """Offset that turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) seconds into Unix time."""
    return time.time() - time.monotonic_ns() / 1e9
