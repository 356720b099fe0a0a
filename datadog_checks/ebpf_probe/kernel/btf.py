# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""BTF, the kernel's type information or a BPF object's, through libbpf's btf__* calls.

libbpf parses and checks the BTF, finds types by name and id, names them and sizes them. What
its header offers only as inline functions (a type's kind, members, array, enum values,
prototype parameters, a section's variables) is read here from the type records it returns.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

from . import libbpf, uapi

VMLINUX_BTF = '/sys/kernel/btf/vmlinux'

_TYPE = struct.Struct('<III')  # struct btf_type: name_off, info, size_or_type
_MODIFIERS = frozenset(
    {uapi.BTF_KIND_TYPEDEF, uapi.BTF_KIND_VOLATILE, uapi.BTF_KIND_CONST, uapi.BTF_KIND_RESTRICT, uapi.BTF_KIND_TYPE_TAG}
)


class Btf:
    """Read-only BTF. Opening raises OSError (LibbpfError) for a file that is missing or not BTF;
    lookups of what is not there raise LookupError."""

    def __init__(self, ptr: int, owned: bool = True):
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def open(cls, path: str | None = None) -> Btf:
        """The kernel's BTF, or the BTF in a file (raw, or an ELF object's .BTF)."""
        path = path or VMLINUX_BTF
        lib = libbpf.lib()
        return cls(libbpf.call_ptr(f'reading the BTF in {path} (btf__parse)', lib.btf__parse, path.encode(), None))

    @classmethod
    def from_kernel(cls, btf_id: int, base: Btf | None = None) -> Btf:
        """A BTF object the kernel holds (a loaded program's, the kernel's or a module's), by id; a
        module's is split BTF, read on top of the kernel's (base)."""
        lib = libbpf.lib()
        if base is not None:
            call = f'btf__load_from_kernel_by_id_split({btf_id})'
            return cls(libbpf.call_ptr(call, lib.btf__load_from_kernel_by_id_split, btf_id, base._ptr))
        return cls(libbpf.call_ptr(f'btf__load_from_kernel_by_id({btf_id})', lib.btf__load_from_kernel_by_id, btf_id))

    @classmethod
    def of_object(cls, obj: libbpf.BpfObject) -> Btf:
        """An opened BPF object's own BTF, valid while the object is open."""
        return cls(libbpf.call_ptr('bpf_object__btf', libbpf.lib().bpf_object__btf, obj.pointer), owned=False)

    def close(self) -> None:
        if self._ptr and self._owned:
            libbpf.lib().btf__free(self._ptr)
        self._ptr = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- libbpf's lookups -------------------------------------------------------------------------

    def find(self, name: str, kind: int) -> int | None:
        """Type id of `name` of `kind`, or None."""
        type_id = libbpf.lib().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return type_id if type_id > 0 else None

    def has_function(self, name: str) -> bool:
        """Whether a function of that name is in the BTF (the kernel lists its kfuncs so)."""
        return self.find(name, uapi.BTF_KIND_FUNC) is not None

    def has_struct(self, name: str) -> bool:
        return self.find(name, uapi.BTF_KIND_STRUCT) is not None

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(address of its record, kind, vlen, size_or_type) of a type; id 0 is void."""
        address = libbpf.lib().btf__type_by_id(self._ptr, type_id) if type_id > 0 else None
        if not address:
            raise LookupError(f'no BTF type {type_id}')
        _name, info, size_or_type = _TYPE.unpack(ctypes.string_at(address, _TYPE.size))
        return address, (info >> 24) & 0x1F, info & 0xFFFF, size_or_type

    def _string(self, offset: int) -> str:
        name = libbpf.lib().btf__name_by_offset(self._ptr, offset)
        return name.decode('ascii', 'replace') if name else ''

    def name(self, type_id: int) -> str:
        return self._string(_TYPE.unpack(ctypes.string_at(self._type(type_id)[0], _TYPE.size))[0])

    def size(self, type_id: int) -> int:
        size = libbpf.lib().btf__resolve_size(self._ptr, type_id)
        if size < 0:
            raise LookupError(f'BTF type {type_id} has no size')
        return size

    # --- what libbpf's header gives as inline functions: the records after a type's header --------

    def _items(self, address: int, vlen: int, layout: str) -> Iterator[tuple[int, ...]]:
        size = struct.calcsize(layout)
        return struct.iter_unpack(layout, ctypes.string_at(address + _TYPE.size, size * vlen))

    def kind(self, type_id: int) -> int:
        return self._type(type_id)[1]

    def skip_modifiers(self, type_id: int) -> int:
        """Follow typedefs, const, volatile... to the type they name."""
        while type_id:
            _address, kind, _vlen, target = self._type(type_id)
            if kind not in _MODIFIERS:
                break
            type_id = target
        return type_id

    def pointee(self, type_id: int) -> int:
        """The type a pointer (after modifiers) points to."""
        _address, kind, _vlen, target = self._type(self.skip_modifiers(type_id))
        if kind != uapi.BTF_KIND_PTR:
            raise LookupError(f'BTF type {type_id} is not a pointer')
        return target

    def array(self, type_id: int) -> tuple[int, int]:
        """(element type id, number of elements) of an array type."""
        address, kind, _vlen, _size = self._type(self.skip_modifiers(type_id))
        if kind != uapi.BTF_KIND_ARRAY:
            raise LookupError(f'BTF type {type_id} is not an array')
        element, _index_type, count = next(self._items(address, 1, '<III'))
        return element, count

    def members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of each member of a struct or union."""
        type_id = self.skip_modifiers(type_id)
        address, kind, vlen, _size = self._type(type_id)
        if kind not in (uapi.BTF_KIND_STRUCT, uapi.BTF_KIND_UNION):
            raise LookupError(f'BTF type {type_id} is not a struct or union')
        bitfields = _TYPE.unpack(ctypes.string_at(address, _TYPE.size))[1] >> 31
        return [
            (self._string(name), member_type, (offset & 0xFFFFFF) if bitfields else offset)
            for name, member_type, offset in self._items(address, vlen, '<III')
        ]

    def struct_members(self, name: str) -> list[str] | None:
        """Member names of a struct; None when absent or when it has anonymous members (see members())."""
        type_id = self.find(name, uapi.BTF_KIND_STRUCT)
        if type_id is None:
            return None
        names = [member for member, _type, _offset in self.members(type_id)]
        return names if names and all(names) else None

    def member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(byte offset, type id) of a member, looking into anonymous structs and unions."""
        for member_name, member_type, bit_offset in self.members(type_id):
            if member_name == name:
                return bit_offset // 8, member_type
            if not member_name and self.kind(self.skip_modifiers(member_type)) in (
                uapi.BTF_KIND_STRUCT,
                uapi.BTF_KIND_UNION,
            ):
                inner = self.member(member_type, name)
                if inner is not None:
                    return bit_offset // 8 + inner[0], inner[1]
        return None

    def member_path(self, struct_name: str, path: str) -> tuple[int, int]:
        """(byte offset, type id) of a dotted member path ('shared_pending.signal') in a struct."""
        type_id = self.find(struct_name, uapi.BTF_KIND_STRUCT)
        if type_id is None:
            raise LookupError(f'struct {struct_name}')
        total = 0
        for part in path.split('.'):
            member = self.member(type_id, part)
            if member is None:
                raise LookupError(f'{struct_name}.{path}')
            total += member[0]
            type_id = member[1]
        return total, type_id

    def enum_value(self, enum_name: str, value_name: str) -> int | None:
        for kind, layout in ((uapi.BTF_KIND_ENUM, '<Ii'), (uapi.BTF_KIND_ENUM64, '<III')):
            type_id = self.find(enum_name, kind)
            if type_id is None:
                continue
            address, _kind, vlen, _size = self._type(type_id)
            for item in self._items(address, vlen, layout):
                if self._string(item[0]) == value_name:
                    return item[1] if kind == uapi.BTF_KIND_ENUM else (item[2] << 32) | item[1]
        return None

    def func_proto_params(self, type_id: int) -> list[int]:
        """Parameter type ids of a function prototype (through typedefs and a pointer)."""
        type_id = self.skip_modifiers(type_id)
        if self.kind(type_id) == uapi.BTF_KIND_PTR:
            type_id = self.skip_modifiers(self.pointee(type_id))
        address, kind, vlen, _size = self._type(type_id)
        if kind != uapi.BTF_KIND_FUNC_PROTO:
            raise LookupError(f'BTF type {type_id} is not a function prototype')
        return [param_type for _name, param_type in self._items(address, vlen, '<II')]

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of the variables in a data section (.rodata, .bss...)."""
        type_id = self.find(section, uapi.BTF_KIND_DATASEC)
        if type_id is None:
            return {}
        address, _kind, vlen, _size = self._type(type_id)
        return {self.name(var): (offset, size) for var, offset, size in self._items(address, vlen, '<III')}


def has_vmlinux_btf() -> bool:
    return os.path.exists(VMLINUX_BTF)


def set_rodata(obj: libbpf.BpfObject, values: dict[str, bytes]) -> None:
    """Set an opened object's `const volatile` globals before load, by name (as a skeleton would)."""
    variables = Btf.of_object(obj).datasec_vars('.rodata')
    address, size = obj.map('.rodata').initial_value()
    for name, value in values.items():
        if name not in variables:
            raise KeyError(f'{name} is not a .rodata variable of {os.path.basename(obj.path)}')
        offset, var_size = variables[name]
        if len(value) != var_size or offset + var_size > size:
            raise ValueError(f'{name} is {var_size} bytes, got {len(value)}')
        ctypes.memmove(address + offset, value, var_size)


def program_function_name(fd: int, info: uapi.BpfProgInfo) -> str | None:
    """A loaded program's full function name from its BTF (the kernel keeps only 15 characters)."""
    if not info.btf_id or not info.nr_func_info or info.func_info_rec_size < ctypes.sizeof(uapi.BpfFuncInfo):
        return None
    buf = ctypes.create_string_buffer(info.func_info_rec_size)
    query = uapi.BpfProgInfo(
        nr_func_info=1, func_info_rec_size=info.func_info_rec_size, func_info=ctypes.addressof(buf)
    )
    libbpf.object_info(fd, query)
    type_id = uapi.BpfFuncInfo.from_buffer(buf).type_id
    try:
        with Btf.from_kernel(info.btf_id) as btf:
            return btf.name(type_id) or None
    except (OSError, LookupError):  # the program and its BTF went away meanwhile
        return None
