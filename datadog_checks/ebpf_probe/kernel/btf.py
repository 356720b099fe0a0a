# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The one BTF reader: the kernel's type information, or a BPF object's, read in place.

Looking a type up by name is cheap: the name is found in the string section, then the type
records naming it (about 0.5 ms on the kernel's 5 MB, the file mapped rather than copied).
Following type ids (struct members, pointers, prototypes) needs the position of every type:
that index is built once, on first need (~75 ms on the kernel's BTF, nothing on an object's).
The CO-RE start-up path only ever asks by name.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Iterator

from . import uapi

VMLINUX_BTF = '/sys/kernel/btf/vmlinux'

_HEADER = struct.Struct('<HBBIIIII')  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_MAGIC = 0xEB9F
_TYPE = struct.Struct('<III')  # name_off, info, size_or_type
_MODIFIERS = frozenset(
    {uapi.BTF_KIND_TYPEDEF, uapi.BTF_KIND_VOLATILE, uapi.BTF_KIND_CONST, uapi.BTF_KIND_RESTRICT, uapi.BTF_KIND_TYPE_TAG}
)
POINTER_SIZE = 8  # the kernels this reads are 64-bit


def _trailing_size(kind: int, vlen: int) -> int:
    """Bytes after a type record's 12-byte header."""
    if kind in (uapi.BTF_KIND_INT, uapi.BTF_KIND_VAR, uapi.BTF_KIND_DECL_TAG):
        return 4
    if kind == uapi.BTF_KIND_ARRAY:
        return 12
    if kind in (uapi.BTF_KIND_STRUCT, uapi.BTF_KIND_UNION, uapi.BTF_KIND_DATASEC, uapi.BTF_KIND_ENUM64):
        return 12 * vlen
    if kind in (uapi.BTF_KIND_ENUM, uapi.BTF_KIND_FUNC_PROTO):
        return 8 * vlen
    return 0


class Btf:
    """Read-only BTF. Raises ValueError for data that is not BTF, OSError for a file it cannot read."""

    def __init__(self, data: bytes | mmap.mmap):
        self._data = data
        if len(data) < _HEADER.size or _HEADER.unpack_from(data)[0] != _MAGIC:
            self.close()
            raise ValueError('not BTF')
        _magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        self._types, self._types_end = hdr_len + type_off, hdr_len + type_off + type_len
        self._strings, self._strings_end = hdr_len + str_off, hdr_len + str_off + str_len
        self._positions: list[int] | None = None  # type id - 1 -> position of its record

    @classmethod
    def open(cls, path: str | None = None) -> Btf:
        path = path or VMLINUX_BTF
        fd = os.open(path, os.O_RDONLY)
        try:
            try:  # sysfs files can be mapped from 6.16 on; copy them on older kernels
                data: bytes | mmap.mmap = mmap.mmap(
                    fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ
                )
            except (OSError, ValueError):
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                data = b''.join(chunks)
        finally:
            os.close(fd)
        try:
            return cls(data)
        except ValueError:
            raise ValueError(f'{path} is not BTF') from None

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        self._data = b''

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- by name: no index -------------------------------------------------------------------------

    def _string(self, offset: int) -> str:
        start = self._strings + offset
        if start >= self._strings_end:
            return ''
        return self._data[start : self._data.find(b'\0', start, self._strings_end)].decode('ascii', 'replace')

    def _records(self, name: str, kind: int) -> Iterator[tuple[int, int]]:
        """(position, info) of each type record of that kind and name."""
        data = self._data
        at = data.find(b'\0' + name.encode() + b'\0', self._strings, self._strings_end)
        if at < 0:
            return
        needle = struct.pack('<I', at + 1 - self._strings)
        position = self._types
        while (position := data.find(needle, position, self._types_end)) >= 0:
            if (position - self._types) % 4 == 0:
                info = struct.unpack_from('<I', data, position + 4)[0]
                if (info >> 24) & 0x1F == kind:
                    yield position, info
            position += 1

    def has_function(self, name: str) -> bool:
        """Whether a function of that name is in the BTF (the kernel lists its kfuncs so)."""
        return next(self._records(name, uapi.BTF_KIND_FUNC), None) is not None

    def has_struct(self, name: str) -> bool:
        return next(self._records(name, uapi.BTF_KIND_STRUCT), None) is not None

    def struct_members(self, name: str) -> list[str] | None:
        """Member names of a struct; None when absent or when it has anonymous members (see members())."""
        for position, info in self._records(name, uapi.BTF_KIND_STRUCT):
            members = struct.iter_unpack('<III', self._data[position + 12 : position + 12 + 12 * (info & 0xFFFF)])
            names = [self._string(m[0]) for m in members]
            if names and all(names):
                return names
        return None

    # --- by type id: the index ------------------------------------------------------------------

    def _index(self) -> list[int]:
        if self._positions is None:
            positions = []
            data, position, end = self._data, self._types, self._types_end
            unpack = _TYPE.unpack_from
            while position < end:
                positions.append(position)
                info = unpack(data, position)[1]
                position += 12 + _trailing_size((info >> 24) & 0x1F, info & 0xFFFF)
            self._positions = positions
        return self._positions

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(position, kind, vlen, size_or_type) of a type; id 0 is void."""
        positions = self._index()
        if not 0 < type_id <= len(positions):
            raise LookupError(f'no BTF type {type_id}')
        position = positions[type_id - 1]
        _name, info, size_or_type = _TYPE.unpack_from(self._data, position)
        return position, (info >> 24) & 0x1F, info & 0xFFFF, size_or_type

    def find(self, name: str, kind: int) -> int | None:
        """Type id of `name` of `kind`, or None."""
        for position, _info in self._records(name, kind):
            positions = self._index()
            i = bisect.bisect_left(positions, position)
            if i < len(positions) and positions[i] == position:
                return i + 1
        return None

    def kind(self, type_id: int) -> int:
        return self._type(type_id)[1]

    def name(self, type_id: int) -> str:
        return self._string(_TYPE.unpack_from(self._data, self._type(type_id)[0])[0])

    def skip_modifiers(self, type_id: int) -> int:
        """Follow typedefs, const, volatile... to the type they name."""
        while type_id:
            _position, kind, _vlen, target = self._type(type_id)
            if kind not in _MODIFIERS:
                break
            type_id = target
        return type_id

    def size(self, type_id: int) -> int:
        type_id = self.skip_modifiers(type_id)
        position, kind, _vlen, size = self._type(type_id)
        if kind == uapi.BTF_KIND_PTR:
            return POINTER_SIZE
        if kind == uapi.BTF_KIND_ARRAY:
            element, _index_type, count = struct.unpack_from('<III', self._data, position + 12)
            return count * self.size(element)
        return size

    def pointee(self, type_id: int) -> int:
        """The type a pointer (after modifiers) points to."""
        _position, kind, _vlen, target = self._type(self.skip_modifiers(type_id))
        if kind != uapi.BTF_KIND_PTR:
            raise LookupError(f'BTF type {type_id} is not a pointer')
        return target

    def array(self, type_id: int) -> tuple[int, int]:
        """(element type id, number of elements) of an array type."""
        position, kind, _vlen, _size = self._type(self.skip_modifiers(type_id))
        if kind != uapi.BTF_KIND_ARRAY:
            raise LookupError(f'BTF type {type_id} is not an array')
        element, _index_type, count = struct.unpack_from('<III', self._data, position + 12)
        return element, count

    def _items(self, position: int, vlen: int, layout: str) -> Iterator[tuple[int, ...]]:
        size = struct.calcsize(layout)
        return struct.iter_unpack(layout, self._data[position + 12 : position + 12 + size * vlen])

    def members(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of each member of a struct or union."""
        type_id = self.skip_modifiers(type_id)
        position, kind, vlen, _size = self._type(type_id)
        if kind not in (uapi.BTF_KIND_STRUCT, uapi.BTF_KIND_UNION):
            raise LookupError(f'BTF type {type_id} is not a struct or union')
        bitfields = _TYPE.unpack_from(self._data, position)[1] >> 31
        return [
            (self._string(name), member_type, (offset & 0xFFFFFF) if bitfields else offset)
            for name, member_type, offset in self._items(position, vlen, '<III')
        ]

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
            position, _kind, vlen, _size = self._type(type_id)
            for item in self._items(position, vlen, layout):
                if self._string(item[0]) == value_name:
                    return item[1] if kind == uapi.BTF_KIND_ENUM else (item[2] << 32) | item[1]
        return None

    def func_proto_params(self, type_id: int) -> list[int]:
        """Parameter type ids of a function prototype (through typedefs and a pointer)."""
        type_id = self.skip_modifiers(type_id)
        if self.kind(type_id) == uapi.BTF_KIND_PTR:
            type_id = self.skip_modifiers(self.pointee(type_id))
        position, kind, vlen, _size = self._type(type_id)
        if kind != uapi.BTF_KIND_FUNC_PROTO:
            raise LookupError(f'BTF type {type_id} is not a function prototype')
        return [param_type for _name, param_type in self._items(position, vlen, '<II')]

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of the variables in a data section (.rodata, .bss...)."""
        type_id = self.find(section, uapi.BTF_KIND_DATASEC)
        if type_id is None:
            return {}
        position, _kind, vlen, _size = self._type(type_id)
        return {self.name(var): (offset, size) for var, offset, size in self._items(position, vlen, '<III')}


def has_vmlinux_btf() -> bool:
    return os.path.exists(VMLINUX_BTF)
