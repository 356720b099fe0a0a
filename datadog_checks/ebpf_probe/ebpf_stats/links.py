# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""BPF links: their ids (a new link can change who owns a program) and the runs kprobes missed.

A kprobe misses a run when it fires while another BPF program runs on that CPU (the kernel
does not nest them). Kernels from 6.7 count these per attachment and say so in
bpf_link_info: `perf_event.kprobe.missed` for a kprobe or kretprobe attached through a perf
event link (libbpf's way since 1.0, on 5.15+), `kprobe_multi.missed` for a kprobe_multi link.
Kprobes attached without a link (BCC, the perf_event ioctl) have no such counter here.
A link's type never changes under its id, so it is asked once; the missed count of each
kprobe link, every run.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.kernel.btf import Btf

# enum bpf_link_type, enum bpf_perf_event_type (include/uapi/linux/bpf.h)
BPF_LINK_TYPE_PERF_EVENT = 7
BPF_LINK_TYPE_KPROBE_MULTI = 8
BPF_PERF_EVENT_KPROBE = 3
BPF_PERF_EVENT_KRETPROBE = 4

# Offsets in struct bpf_link_info (its union starts at 16, 8-byte aligned).
LINK_HEADER = struct.Struct('<III')  # type, id, prog_id
PERF_EVENT_TYPE_AT = 16  # perf_event.type
PERF_EVENT_NAME_AT = 24  # perf_event.kprobe.func_name (an address) and name_len: filled in by the caller
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


def read_link(link_id: int, with_missed: bool) -> LinkInfo | None:
    """What a link is (None if it went away meanwhile)."""
    fd = libbpf.fd_by_id('link', link_id)
    if fd is None:
        return None
    try:
        first = decode_link_info(libbpf.link_info(fd), with_missed=False)
        if first.type != BPF_LINK_TYPE_PERF_EVENT:
            return decode_link_info(libbpf.link_info(fd), with_missed) if with_missed and first.kprobe else first
        # A perf event link says what it is only when given a buffer for the probed function's name.
        return decode_link_info(libbpf.link_info(fd, name_at=PERF_EVENT_NAME_AT), with_missed)
    except libbpf.LibbpfError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ENOSPC, errno.EOPNOTSUPP):
            # Gone, or a kind of link this kernel cannot describe: not a kprobe we can count.
            return None if e.errno == errno.ENOENT else LinkInfo(link_id, -1, 0, False, None)
        raise
    finally:
        os.close(fd)


class Links:
    """Every link's id, and what each program's kprobe links missed (summed per program)."""

    def __init__(self, count_misses: bool):
        self.count_misses = count_misses
        self._known: dict[int, LinkInfo] = {}

    def scan(self) -> tuple[set[int], dict[int, int]]:
        """(ids of every link, program id -> runs its kprobe links missed so far)."""
        ids = set(libbpf.object_ids('link'))
        for gone in self._known.keys() - ids:
            del self._known[gone]
        misses: dict[int, int] = {}
        for link_id in ids:
            link = self._known.get(link_id)
            if link is None or (link.kprobe and self.count_misses):
                link = read_link(link_id, self.count_misses)
                if link is None:
                    continue
                self._known[link_id] = link
            if link.missed is not None:
                misses[link.prog_id] = misses.get(link.prog_id, 0) + link.missed
        return ids, misses
