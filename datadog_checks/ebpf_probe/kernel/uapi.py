# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel's user-space API, in one place: numbers and the layouts of the structures the kernel fills
(include/uapi/linux/bpf.h and btf.h)."""

from __future__ import annotations

import ctypes

# enum bpf_map_type
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_RINGBUF = 27

# enum bpf_prog_type
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACING = 26

# enum bpf_stats_type
BPF_STATS_RUN_TIME = 0

# enum bpf_cmd (the few the kernel layer issues without libbpf)
BPF_MAP_CREATE = 0

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# BTF kinds (include/uapi/linux/btf.h)
BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_FWD = 7
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_FLOAT = 16
BTF_KIND_DECL_TAG = 17
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19


# --- Structures the kernel fills (BPF_OBJ_GET_INFO_BY_FD) --------------------------------------


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h); the kernel fills as much as it knows."""

    filled = 0  # bytes the kernel filled (prog_info())

    def knows(self, field: str) -> bool:
        """Whether the kernel filled this field (0 in a field it does not have means unknown)."""
        member = getattr(BpfProgInfo, field)
        return self.filled >= member.offset + member.size

    _fields_ = [
        ('type', ctypes.c_uint32),
        ('id', ctypes.c_uint32),
        ('tag', ctypes.c_uint8 * BPF_TAG_SIZE),
        ('jited_prog_len', ctypes.c_uint32),
        ('xlated_prog_len', ctypes.c_uint32),
        ('jited_prog_insns', ctypes.c_uint64),
        ('xlated_prog_insns', ctypes.c_uint64),
        ('load_time', ctypes.c_uint64),
        ('created_by_uid', ctypes.c_uint32),
        ('nr_map_ids', ctypes.c_uint32),
        ('map_ids', ctypes.c_uint64),
        ('name', ctypes.c_char * BPF_OBJ_NAME_LEN),
        ('ifindex', ctypes.c_uint32),
        ('gpl_compatible', ctypes.c_uint32),
        ('netns_dev', ctypes.c_uint64),
        ('netns_ino', ctypes.c_uint64),
        ('nr_jited_ksyms', ctypes.c_uint32),
        ('nr_jited_func_lens', ctypes.c_uint32),
        ('jited_ksyms', ctypes.c_uint64),
        ('jited_func_lens', ctypes.c_uint64),
        ('btf_id', ctypes.c_uint32),
        ('func_info_rec_size', ctypes.c_uint32),
        ('func_info', ctypes.c_uint64),
        ('nr_func_info', ctypes.c_uint32),
        ('nr_line_info', ctypes.c_uint32),
        ('line_info', ctypes.c_uint64),
        ('jited_line_info', ctypes.c_uint64),
        ('nr_jited_line_info', ctypes.c_uint32),
        ('line_info_rec_size', ctypes.c_uint32),
        ('jited_line_info_rec_size', ctypes.c_uint32),
        ('nr_prog_tags', ctypes.c_uint32),
        ('prog_tags', ctypes.c_uint64),
        ('run_time_ns', ctypes.c_uint64),
        ('run_cnt', ctypes.c_uint64),
        ('recursion_misses', ctypes.c_uint64),
        ('verified_insns', ctypes.c_uint32),
        ('attach_btf_obj_id', ctypes.c_uint32),
        ('attach_btf_id', ctypes.c_uint32),
        ('_pad', ctypes.c_uint32),
    ]


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ('type', ctypes.c_uint32),
        ('id', ctypes.c_uint32),
        ('key_size', ctypes.c_uint32),
        ('value_size', ctypes.c_uint32),
        ('max_entries', ctypes.c_uint32),
        ('map_flags', ctypes.c_uint32),
        ('name', ctypes.c_char * BPF_OBJ_NAME_LEN),
        ('ifindex', ctypes.c_uint32),
        ('btf_vmlinux_value_type_id', ctypes.c_uint32),
        ('netns_dev', ctypes.c_uint64),
        ('netns_ino', ctypes.c_uint64),
        ('btf_id', ctypes.c_uint32),
        ('btf_key_type_id', ctypes.c_uint32),
        ('btf_value_type_id', ctypes.c_uint32),
        ('_pad', ctypes.c_uint32),
        ('map_extra', ctypes.c_uint64),
    ]


class BpfFuncInfo(ctypes.Structure):
    _fields_ = [('insn_off', ctypes.c_uint32), ('type_id', ctypes.c_uint32)]


class BpfLinkInfo(ctypes.Structure):
    """struct bpf_link_info: the part every link has, then its type's part as bytes (decoded by the caller).

    The kernel fills what it knows and requires the rest of a longer buffer to be zero.
    """

    _fields_ = [
        ('type', ctypes.c_uint32),
        ('id', ctypes.c_uint32),
        ('prog_id', ctypes.c_uint32),
        ('_pad', ctypes.c_uint32),
        ('union', ctypes.c_uint8 * 112),
    ]
