# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""BPF links: where each attaches its program (attachments.py), their ids (a new link can change
who owns a program) and the runs kprobes missed.

A kprobe misses a run when it fires while another BPF program runs on that CPU (the kernel
does not nest them). Kernels from 6.7 count these per attachment and say so in
bpf_link_info: `perf_event.kprobe.missed` for a kprobe or kretprobe attached through a perf
event link (libbpf's way since 1.0, on 5.15+), `kprobe_multi.missed` for a kprobe_multi link.
Kprobes attached without a link (BCC, the perf_event ioctl) have no such counter here.
A link's type and target never change under its id, so they are asked once (an fd per new
link); the missed count of each kprobe link, every run.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.kernel.btf import Btf
from datadog_checks.ebpf_probe.kernel.cgroups import CgroupPaths, unified_hierarchy
from datadog_checks.ebpf_probe.kernel.kallsyms import function_names

from . import attachments
from .attachments import Attachment

# enum bpf_link_type, enum bpf_perf_event_type (include/uapi/linux/bpf.h)
BPF_LINK_TYPE_PERF_EVENT = 7
BPF_LINK_TYPE_KPROBE_MULTI = 8
BPF_PERF_EVENT_KPROBE = 3
BPF_PERF_EVENT_KRETPROBE = 4

# Offsets in struct bpf_link_info (its union starts at 16, 8-byte aligned).
LINK_HEADER = struct.Struct('<III')  # type, id, prog_id
PERF_EVENT_TYPE_AT = 16  # perf_event.type
PERF_EVENT_KPROBE_MISSED_AT = 48  # perf_event.kprobe.missed (6.7+)
KPROBE_MULTI_MISSED_AT = 32  # kprobe_multi.missed (6.7+)

# The fields' paths in the kernel's BTF of struct bpf_link_info, to tell whether it has them.
MISSED_FIELDS = {'perf_event.kprobe.missed': PERF_EVENT_KPROBE_MISSED_AT, 'kprobe_multi.missed': KPROBE_MULTI_MISSED_AT}


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    kprobe: bool  # a kprobe or kretprobe (perf event or kprobe_multi)
    missed: int | None  # runs the kprobe missed, when the kernel says
    attachment: Attachment | None = None


def decode_link_info(data: bytes, with_missed: bool) -> LinkInfo:
    """A struct bpf_link_info as the kernel filled it (for a perf_event link, with a name buffer given)."""
    link_type, link_id, prog_id = LINK_HEADER.unpack_from(data, 0)
    kprobe, missed = False, None
    if link_type == BPF_LINK_TYPE_KPROBE_MULTI:
        kprobe = True
        if with_missed:
            missed = struct.unpack_from('<Q', data, KPROBE_MULTI_MISSED_AT)[0]
    elif link_type == BPF_LINK_TYPE_PERF_EVENT:
        perf_type = struct.unpack_from('<I', data, PERF_EVENT_TYPE_AT)[0]
        if perf_type in (BPF_PERF_EVENT_KPROBE, BPF_PERF_EVENT_KRETPROBE):
            kprobe = True
            if with_missed:
                missed = struct.unpack_from('<Q', data, PERF_EVENT_KPROBE_MISSED_AT)[0]
    return LinkInfo(link_id, link_type, prog_id, kprobe, missed)


def kernel_counts_kprobe_misses(btf: Btf) -> bool:
    """Whether the kernel's bpf_link_info has the missed counts (6.7+), from its BTF."""
    for path, offset in MISSED_FIELDS.items():
        try:
            if btf.member_path('bpf_link_info', path)[0] != offset:
                return False
        except LookupError:
            return False
    return True


class KernelNames:
    """attachments.Names from the kernel: BTF objects, the cgroup hierarchy, interfaces, kallsyms."""

    def __init__(self, cgroups: CgroupPaths) -> None:
        self._cgroups = cgroups  # kept by Links between scans: the hierarchy is walked for unseen ids only
        self._btf: dict[int, Btf | None] = {}  # held for one scan: the kernel's BTF is megabytes

    def attach_type(self, attach_type: int) -> str:
        return libbpf.attach_type_name(attach_type)

    def btf_type(self, btf_object_id: int, type_id: int) -> str | None:
        if btf_object_id not in self._btf:
            self._btf[btf_object_id] = self._load_btf(btf_object_id)
        btf = self._btf[btf_object_id]
        if btf is None:
            return None
        try:
            return btf.name(type_id) or None
        except LookupError:
            return None

    def _load_btf(self, btf_object_id: int) -> Btf | None:
        try:
            return Btf.from_kernel(btf_object_id)
        except OSError:
            pass
        try:  # a module's BTF, split on top of the kernel's
            base = self._btf.get(0) or Btf.open()
            self._btf[0] = base
            return Btf.from_kernel(btf_object_id, base)
        except OSError:
            return None

    def cgroup(self, cgroup_id: int) -> str | None:
        return self._cgroups.path(cgroup_id)

    def interface(self, ifindex: int, prog_id: int, attach_type: int | None) -> str | None:
        # An index is a name only in one network namespace: named where this process's namespace
        # has the program on the interface of that index, else not named at all.
        if attach_type is None:
            here = libbpf.xdp_program(ifindex) == prog_id
        else:
            here = prog_id in (libbpf.attached_programs(ifindex, attach_type) or ())
        return attachments.interface_name(ifindex) if here else None

    def functions(self, addresses: list[int]) -> list[str | None]:
        return function_names(addresses)

    def done(self) -> None:
        for btf in self._btf.values():
            if btf is not None:
                btf.close()
        self._btf = {}


def read_link(link_id: int, with_missed: bool, names: KernelNames | None = None) -> LinkInfo | None:
    """What a link is, and with names, where it attaches (None if it went away meanwhile)."""
    fd = libbpf.fd_by_id('link', link_id)
    if fd is None:
        return None
    try:
        data, buffer = libbpf.link_info(fd)
        link_type = LINK_HEADER.unpack_from(data, 0)[0]
        if link_type in attachments.BUFFERS:
            # A perf event link says what it is only when given a buffer for the probed function's name.
            data, buffer = libbpf.link_info(fd, *attachments.BUFFERS[link_type])
        elif link_type == attachments.KPROBE_MULTI and names is not None:
            count = struct.unpack_from('<I', data, attachments.KPROBE_MULTI_COUNT)[0]
            if count:  # its functions' addresses: a second call with room for them
                at = attachments.KPROBE_MULTI_ADDRS
                data, buffer = libbpf.link_info(fd, at, attachments.KPROBE_MULTI_COUNT, 8 * count, count=count)
        link = decode_link_info(data, with_missed)
        if names is None:
            return link
        where = attachments.describe(link.type, link.prog_id, data, buffer, names)
        return LinkInfo(link.id, link.type, link.prog_id, link.kprobe, link.missed, where)
    except libbpf.LibbpfError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENOSPC, errno.EOPNOTSUPP):
            # Gone, or a kind of link this kernel cannot describe: not a kprobe we can count.
            return None if e.errno == errno.ENOENT else LinkInfo(link_id, -1, 0, False, None, Attachment('link', None))
        raise
    finally:
        os.close(fd)


class Links:
    """Every link's id and attachment, and what each program's kprobe links missed (summed per program)."""

    def __init__(self, count_misses: bool):
        self.count_misses = count_misses
        self._known: dict[int, LinkInfo] = {}
        self._cgroups = CgroupPaths(unified_hierarchy())

    def scan(self) -> tuple[set[int], dict[int, int], dict[int, list[Attachment]]]:
        """(ids of every link, program id -> runs its kprobe links missed so far, program id -> attachments)."""
        ids = set(libbpf.object_ids('link'))
        for gone in self._known.keys() - ids:
            del self._known[gone]
        misses: dict[int, int] = {}
        attached: dict[int, list[Attachment]] = {}
        names = None
        try:
            for link_id in sorted(ids):
                link = self._known.get(link_id)
                if link is None:
                    names = names or KernelNames(self._cgroups)
                    link = read_link(link_id, self.count_misses, names)
                elif link.kprobe and self.count_misses:
                    again = read_link(link_id, self.count_misses)
                    link = again and LinkInfo(again.id, again.type, again.prog_id, again.kprobe, again.missed,
                                              link.attachment)  # fmt: skip
                if link is None:
                    continue
                self._known[link_id] = link
                if link.missed is not None:
                    misses[link.prog_id] = misses.get(link.prog_id, 0) + link.missed
                if link.attachment is not None:
                    attached.setdefault(link.prog_id, []).append(link.attachment)
        finally:
            if names is not None:
                names.done()
        return ids, misses, attached
