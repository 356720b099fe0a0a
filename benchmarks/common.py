# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Shared bits of the benchmarks: statistics, memory readings, child processes, the results table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datadog_checks.ebpf_probe.kernel import libbpf

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / '.cache' / 'bench'
PYTHON = sys.executable


def summary(values: list[float]) -> dict:
    return {
        'median': statistics.median(values),
        'min': min(values),
        'max': max(values),
        'runs': len(values),
        'values': values,
    }


def status_kb(field_name: str, pid: int | str = 'self') -> int:
    """A memory figure of /proc/<pid>/status in kB (VmRSS, VmHWM...)."""
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise KeyError(field_name)


def run_child(args: list[str], env: dict | None = None, timeout: float = 300) -> dict:
    """Run a benchmark child process; its last stdout line is its JSON result."""
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f'{args} failed ({result.returncode}): {result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_c(source: str, output: str, libs: tuple[str, ...] = ()) -> Path:
    """Compile one of the benchmark's C programs into .cache/bench (cached by modification time)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    src = REPO / 'benchmarks' / source
    out = BUILD / output
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(['gcc', '-O2', '-Wall', '-o', str(out), str(src), *libs], check=True)
    return out


@dataclass
class Row:
    benchmark: str
    figure: str
    unit: str
    stats: dict | None = None  # summary() of measured values
    value: float | None = None  # a single figure (a ratio, a count)
    goal: str = ''
    met: bool | None = None
    note: str = ''


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    context: dict = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        def fmt(x: float | None) -> str:
            if x is None:
                return ''
            if abs(x) >= 100:
                return f'{x:,.0f}'
            if abs(x) >= 10:
                return f'{x:.1f}'
            return f'{x:.3g}'

        lines = [
            '| Benchmark | Figure | Median | Min | Max | Goal | Met |',
            '|---|---|---|---|---|---|---|',
        ]
        for r in self.rows:
            if r.stats is not None:
                median, low, high = (fmt(r.stats[k]) + f' {r.unit}' for k in ('median', 'min', 'max'))
            else:
                median, low, high = fmt(r.value) + (f' {r.unit}' if r.unit else ''), '', ''
            met = '' if r.met is None else ('yes' if r.met else '**no**')
            figure = r.figure + (f' ({r.note})' if r.note else '')
            lines.append(f'| {r.benchmark} | {figure} | {median} | {low} | {high} | {r.goal} | {met} |')
        return '\n'.join(lines)

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [dict(r.__dict__) for r in self.rows]
        path.write_text(json.dumps({'context': self.context, 'rows': rows}, indent=2) + '\n')


def program_ns_per_run(name: str) -> float | None:
    """run_time_ns / run_cnt of the program of that name (the kernel's, 15 characters) that ran most."""
    best = None
    for _prog_id, fd in libbpf.open_objects('prog'):
        info = libbpf.prog_info(fd)
        if info.name.decode() == name and info.run_cnt and (best is None or info.run_cnt > best[0]):
            best = (info.run_cnt, info.run_time_ns / info.run_cnt)
    return best[1] if best else None
