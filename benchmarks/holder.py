# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""A process that holds what a busy host has: open files and BPF objects, as another tool would.

    python -m benchmarks.holder --fds 18000 --maps 2000 --programs 1000 [--name-groups N] [--links 1]

Prints one JSON line (its pid, the object ids) once everything is open, then holds it all until
its stdin closes. Objects are named uniquely (the most series) unless --name-groups folds them
into that many names. With --links 1 the programs are raw tracepoint programs, each attached by a
link of its own to a tracepoint that fires only on an OOM kill (mark_victim).
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
from tests.bpf_syscalls import map_create, prog_load, raw_tracepoint_open

MAP_HASH = 1
PROG_SOCKET_FILTER = 1
PROG_RAW_TRACEPOINT = 17
RETURN_ZERO = bytes.fromhex('b700000000000000') + bytes.fromhex('9500000000000000')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--fds', type=int, default=0)
    parser.add_argument('--maps', type=int, default=0)
    parser.add_argument('--programs', type=int, default=0)
    parser.add_argument('--name-groups', type=int, default=0)
    parser.add_argument('--comm', default='bench-holder')
    parser.add_argument('--links', type=int, default=0)
    args = parser.parse_args()
    ctypes.CDLL(None).prctl(15, args.comm.encode(), 0, 0, 0)  # PR_SET_NAME
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tag = uuid.uuid4().hex[:4]

    def name(kind: str, i: int) -> str:
        return f'{kind}{tag}_{i % args.name_groups if args.name_groups else i}'

    held = [os.open('/dev/null', os.O_RDONLY) for _ in range(args.fds)]
    maps = [map_create(MAP_HASH, name('m', i), 4, 8, 64) for i in range(args.maps)]
    kind = PROG_RAW_TRACEPOINT if args.links else PROG_SOCKET_FILTER
    programs = [prog_load(kind, name('p', i), RETURN_ZERO) for i in range(args.programs)]
    links = [raw_tracepoint_open('mark_victim', fd) for fd in programs] if args.links else []
    described = {
        'pid': os.getpid(),
        'fds': len(held),
        'map_ids': [libbpf.map_info(fd).id for fd in maps],
        'program_ids': [libbpf.prog_info(fd).id for fd in programs],
        'links': len(links),
    }
    print(json.dumps(described), flush=True)
    sys.stdin.read()  # hold everything until the benchmark lets go


if __name__ == '__main__':
    main()
