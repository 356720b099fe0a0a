# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Where a link attaches its program, in the user's words: a kind and a target.

From the link's bpf_link_info (include/uapi/linux/bpf.h), read once per link (a link's target
never changes). Targets the kernel gives as numbers are named: a kernel function from its BTF
id, a cgroup from its id, an interface from its index, a kprobe_multi's functions from their
addresses. A name that cannot be told for sure is not made up: an interface in another network
namespace is said to be there, by index.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Protocol

# enum bpf_link_type
RAW_TRACEPOINT, TRACING, CGROUP, ITER, NETNS, XDP, PERF_EVENT, KPROBE_MULTI = 1, 2, 3, 4, 5, 6, 7, 8
STRUCT_OPS, NETFILTER, TCX, UPROBE_MULTI, NETKIT, SOCKMAP = 9, 10, 11, 12, 13, 14

# enum bpf_perf_event_type
PERF_UPROBE, PERF_URETPROBE, PERF_KPROBE, PERF_KRETPROBE, PERF_TRACEPOINT, PERF_EVENT_EVENT = 1, 2, 3, 4, 5, 6

# Where each link type's buffer is (its address, then its size) in bpf_link_info, for the types
# that return a name or a list: the union starts at 16.
BUFFERS = {
    RAW_TRACEPOINT: (16, 24),  # raw_tracepoint.tp_name, tp_name_len
    ITER: (16, 24),  # iter.target_name, target_name_len
    PERF_EVENT: (24, 32),  # perf_event.{uprobe.file_name,kprobe.func_name,tracepoint.tp_name}, name_len
    UPROBE_MULTI: (16, 48),  # uprobe_multi.path, path_size
}
KPROBE_MULTI_ADDRS, KPROBE_MULTI_COUNT = 16, 24  # kprobe_multi.addrs, count (a list of count u64)
KPROBE_MULTI_RETURN = 1  # BPF_F_KPROBE_MULTI_RETURN
UPROBE_MULTI_RETURN = 1  # BPF_F_UPROBE_MULTI_RETURN

# Tracing links' attach types (enum bpf_attach_type) and what users call them.
TRACING_KINDS = {24: 'fentry', 25: 'fexit', 26: 'fmod_ret', 27: 'lsm', 23: 'tp_btf', 28: 'iterator', 43: 'lsm_cgroup'}
# BTF names of tracing targets carry a prefix the user does not write.
BTF_PREFIXES = {'tp_btf': 'btf_trace_', 'lsm': 'bpf_lsm_', 'lsm_cgroup': 'bpf_lsm_'}
NETFILTER_FAMILIES = {2: 'ipv4', 10: 'ipv6', 7: 'bridge', 1: 'inet', 5: 'netdev', 3: 'arp'}

LINK_KINDS = {
    RAW_TRACEPOINT: 'raw_tracepoint',
    TRACING: 'tracing',
    CGROUP: 'cgroup',
    ITER: 'iterator',
    NETNS: 'netns',
    XDP: 'xdp',
    PERF_EVENT: 'perf_event',
    KPROBE_MULTI: 'kprobe_multi',
    STRUCT_OPS: 'struct_ops',
    NETFILTER: 'netfilter',
    TCX: 'tcx',
    UPROBE_MULTI: 'uprobe_multi',
    NETKIT: 'netkit',
    SOCKMAP: 'sockmap',
}
WITHOUT_LINK = 'without_link'  # a program attached through netlink (tc), a perf event ioctl (BCC), a program array...


@dataclass(frozen=True)
class Attachment:
    kind: str  # kprobe, kretprobe, uprobe, tracepoint, raw_tracepoint, fentry, fexit, lsm, cgroup, xdp, tcx...
    target: str | None  # the function, tracepoint, binary, cgroup path, interface...; None: not known
    attach_type: str | None = None  # the kernel's attach type where a kind has several (cgroup_inet_ingress...)


class Names(Protocol):
    """What names the kernel's numbers (the kernel calls; fakes in unit tests)."""

    def attach_type(self, attach_type: int) -> str: ...

    def btf_type(self, btf_object_id: int, type_id: int) -> str | None: ...

    def cgroup(self, cgroup_id: int) -> str | None: ...

    def interface(self, ifindex: int, prog_id: int, attach_type: int | None) -> str | None: ...

    def functions(self, addresses: list[int]) -> list[str | None]: ...


def _c_string(buffer: bytes) -> str | None:
    text = buffer.split(b'\0', 1)[0].decode('utf-8', 'backslashreplace')
    return text or None


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from('<I', data, at)[0]


def _u64(data: bytes, at: int) -> int:
    return struct.unpack_from('<Q', data, at)[0]


def interface_target(ifindex: int, prog_id: int, attach_type: int | None, names: Names) -> str:
    name = names.interface(ifindex, prog_id, attach_type)
    return name if name is not None else f'ifindex {ifindex} (another network namespace)'


def describe(link_type: int, prog_id: int, data: bytes, buffer: bytes, names: Names) -> Attachment:
    """A link's attachment from its bpf_link_info (data) and the buffer the kernel filled for it."""
    kind = LINK_KINDS.get(link_type, f'link_type_{link_type}')
    if link_type == RAW_TRACEPOINT:
        return Attachment('raw_tracepoint', _c_string(buffer))
    if link_type == TRACING:
        attach_type, obj_id, type_id = _u32(data, 16), _u32(data, 20), _u32(data, 24)
        kind = TRACING_KINDS.get(attach_type) or names.attach_type(attach_type)
        if attach_type == 0 and obj_id:  # freplace: the target is a program
            return Attachment('freplace', f'program {obj_id}')
        target = names.btf_type(obj_id, type_id) if obj_id and type_id else None
        prefix = BTF_PREFIXES.get(kind)
        if target and prefix and target.startswith(prefix):
            target = target[len(prefix) :]
        return Attachment(kind, target)
    if link_type == CGROUP:
        cgroup_id, attach_type = _u64(data, 16), _u32(data, 24)
        return Attachment('cgroup', names.cgroup(cgroup_id), names.attach_type(attach_type))
    if link_type == ITER:
        target = _c_string(buffer)
        map_id = _u32(data, 28)
        if target in ('bpf_map_elem', 'bpf_sk_storage_map', 'sockmap') and map_id:
            target = f'{target} (map {map_id})'
        return Attachment('iterator', target)
    if link_type == NETNS:
        netns, attach_type = _u32(data, 16), _u32(data, 20)
        return Attachment('netns', f'net:[{netns}]', names.attach_type(attach_type))
    if link_type == XDP:
        return Attachment('xdp', interface_target(_u32(data, 16), prog_id, None, names))
    if link_type in (TCX, NETKIT):
        ifindex, attach_type = _u32(data, 16), _u32(data, 20)
        return Attachment(kind, interface_target(ifindex, prog_id, attach_type, names), names.attach_type(attach_type))
    if link_type == PERF_EVENT:
        return _perf_event(data, buffer)
    if link_type == KPROBE_MULTI:
        flags = _u32(data, 28)
        count = _u32(data, KPROBE_MULTI_COUNT)
        addresses = list(struct.unpack_from(f'<{len(buffer) // 8}Q', buffer)) if buffer else []
        functions = [f for f in names.functions(addresses[:count]) if f] if any(addresses) else []
        kind = 'kretprobe_multi' if flags & KPROBE_MULTI_RETURN else 'kprobe_multi'
        if not functions:
            return Attachment(kind, f'{count} functions' if count else None)
        more = f' and {count - 1} more' if count > 1 else ''
        return Attachment(kind, functions[0] + more)
    if link_type == UPROBE_MULTI:
        flags = _u32(data, 56)
        return Attachment('uretprobe_multi' if flags & UPROBE_MULTI_RETURN else 'uprobe_multi', _c_string(buffer))
    if link_type == STRUCT_OPS:
        return Attachment('struct_ops', f'map {_u32(data, 16)}')
    if link_type == NETFILTER:
        family, hook, priority = struct.unpack_from('<IIi', data, 16)
        return Attachment('netfilter', f'{NETFILTER_FAMILIES.get(family, family)} hook {hook} priority {priority}')
    if link_type == SOCKMAP:
        map_id, attach_type = _u32(data, 16), _u32(data, 20)
        return Attachment('sockmap', f'map {map_id}', names.attach_type(attach_type))
    return Attachment(kind, None)


def _perf_event(data: bytes, buffer: bytes) -> Attachment:
    perf_type = _u32(data, 16)
    name = _c_string(buffer)
    if perf_type in (PERF_KPROBE, PERF_KRETPROBE):
        offset = _u32(data, 36)
        kind = 'kretprobe' if perf_type == PERF_KRETPROBE else 'kprobe'
        return Attachment(kind, f'{name}+{offset:#x}' if name and offset else name)
    if perf_type in (PERF_UPROBE, PERF_URETPROBE):
        offset = _u32(data, 36)
        kind = 'uretprobe' if perf_type == PERF_URETPROBE else 'uprobe'
        return Attachment(kind, f'{name}+{offset:#x}' if name else None)
    if perf_type == PERF_TRACEPOINT:
        return Attachment('tracepoint', name)
    if perf_type == PERF_EVENT_EVENT:
        config, event_type = _u64(data, 24), _u32(data, 32)
        return Attachment('perf_event', f'type {event_type} config {config:#x}')
    return Attachment('perf_event', None)


def interface_name(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None
