# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""A process that holds what a busy host has: open files and BPF objects, as another tool would.

    python -m benchmarks.holder --fds 18000 --maps 2000 --programs 1000 [--name-groups N]

Prints one JSON line (its pid, the object ids) once everything is open, then holds it all until
its stdin closes. Objects are named uniquely (the most series) unless --name-groups folds them
into that many names.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import sys
import uuid

from datadog_checks.ebpf_probe.kernel import libbpf
from tests.bpf_syscalls import map_create, prog_load

MAP_HASH = 1
PROG_SOCKET_FILTER = 1
RETURN_ZERO = bytes.fromhex('b700000000000000') + bytes.fromhex('9500000000000000')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--fds', type=int, default=0)
    parser.add_argument('--maps', type=int, default=0)
    parser.add_argument('--programs', type=int, default=0)
    parser.add_argument('--name-groups', type=int, default=0)
    parser.add_argument('--comm', default='bench-holder')
    args = parser.parse_args()
    ctypes.CDLL(None).prctl(15, args.comm.encode(), 0, 0, 0)  # PR_SET_NAME
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tag = uuid.uuid4().hex[:4]

    def name(kind: str, i: int) -> str:
        return f'{kind}{tag}_{i % args.name_groups if args.name_groups else i}'

    held = [os.open('/dev/null', os.O_RDONLY) for _ in range(args.fds)]
    maps = [map_create(MAP_HASH, name('m', i), 4, 8, 64) for i in range(args.maps)]
    programs = [prog_load(PROG_SOCKET_FILTER, name('p', i), RETURN_ZERO) for i in range(args.programs)]
    described = {
        'pid': os.getpid(),
        'fds': len(held),
        'map_ids': [libbpf.map_info(fd).id for fd in maps],
        'program_ids': [libbpf.prog_info(fd).id for fd in programs],
    }
    print(json.dumps(described), flush=True)
    sys.stdin.read()  # hold everything until the benchmark lets go


if __name__ == '__main__':
    main()
