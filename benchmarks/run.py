# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""`make bench`: the measurements of the performance goals, as one markdown table and JSON.

Every figure is a median over repeated runs with min and max; every comparison is a ratio taken in
this same run, on this machine. Nothing here asserts: a missed goal shows as "no" in the table.
Run as root: it loads BPF programs, makes memory cgroups and causes OOM kills in them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from datadog_checks.base.stubs import aggregator
from datadog_checks.ebpf_probe import EbpfProbeCheck
from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe, MetricOptions, StatsMetrics
from datadog_checks.ebpf_probe.ebpf_stats import probe as stats_probe
from datadog_checks.ebpf_probe.ebpf_stats.entries import EntryCounter
from datadog_checks.ebpf_probe.ebpf_stats.probe import MAP_COUNT_OBJECT
from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.resources import bpf_file
from tests.bpf_syscalls import libbpf_version, map_create, map_update_batch, prog_load
from tests.cgroups import MemoryCgroup

from .common import PYTHON, REPO, Results, Row, build_c, program_ns_per_run, run_child, status_kb, summary
from .cost import bench_kill_signals, bench_many_objects, bench_owners, bench_runtime_statistics

log = logging.getLogger('bench')
MAP_HASH = 1
PROG_SOCKET_FILTER = 1
RETURN_ZERO = bytes.fromhex('b700000000000000') + bytes.fromhex('9500000000000000')
KERNEL_HEADERS = REPO / '.cache' / 'kernel-headers'


def say(message: str) -> None:
    print(f'[{datetime.now().strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def thread_cpu_seconds() -> float:
    """User + system CPU of this thread, in ns resolution (getrusage counts in scheduler ticks)."""
    return time.thread_time()


# --- 1. Probe start-up --------------------------------------------------------------------------


def bench_startup(results: Results, runs: int) -> None:
    say(f'start-up: {runs} fresh processes per path')
    loader = build_c('c_loader.c', 'c_loader', ('-lbpf',))
    core_object = str(bpf_file('oom_kill.bpf.o'))
    env = {}
    if not os.path.exists(f'/lib/modules/{os.uname().release}/build') and KERNEL_HEADERS.is_dir():
        env['BCC_KERNEL_SOURCE'] = str(KERNEL_HEADERS)  # this machine has no headers of its own
    c, core, bcc = [], [], []
    for _ in range(runs):  # interleaved, so that drifts of the machine hit every path alike
        c.append(run_child([str(loader), core_object]))
        core.append(run_child([PYTHON, '-m', 'benchmarks.startup_child', 'core']))
        bcc.append(run_child([PYTHON, '-m', 'benchmarks.startup_child', 'bcc'], env=env))
    c_ms = summary([r['ms'] for r in c])
    core_ms = summary([r['ms'] for r in core])
    bcc_ms = summary([r['ms'] for r in bcc])
    results.add(Row('1. start-up', 'C loader (libbpf): open, load, attach', 'ms', c_ms))
    results.add(Row('1. start-up', f'CO-RE path ({core[0]["hooks"][0]})', 'ms', core_ms))
    results.add(Row('1. start-up', f'BCC path ({bcc[0]["hooks"][0]})', 'ms', bcc_ms))
    ratio = core_ms['median'] / c_ms['median']
    results.add(Row('1. start-up', 'CO-RE / C loader time', 'x', value=ratio, goal='<= 1.5x', met=ratio <= 1.5))
    ratio = bcc_ms['median'] / core_ms['median']
    results.add(Row('1. start-up', 'BCC / CO-RE time', 'x', value=ratio, goal='>= 15x', met=ratio >= 15))
    bound = bcc_ms['median'] / c_ms['median']
    results.add(
        Row('1. start-up', 'BCC / C loader time: the most any loader of this object can reach', 'x', value=bound,
            note='libbpf itself spends the C loader\'s time parsing BTF and relocating')
    )  # fmt: skip
    for name, rows in (('CO-RE', core), ('BCC', bcc)):
        added = summary([(r['rss_after_kb'] - r['rss_before_kb']) / 1024 for r in rows])
        goal, met = ('<= 10 MB', added['median'] <= 10) if name == 'CO-RE' else ('', None)
        results.add(Row('1. start-up', f'{name}: RSS added to the process', 'MB', added, goal=goal, met=met))
        peak = summary([(r['hwm_after_kb'] - r['hwm_before_kb']) / 1024 for r in rows])
        results.add(Row('1. start-up', f'{name}: peak RSS added (VmHWM)', 'MB', peak))
    peak = summary([(r['hwm_kb'] - r['hwm_before_kb']) / 1024 for r in c])
    results.add(Row('1. start-up', 'C loader: peak RSS added (VmHWM)', 'MB', peak))


# --- 2. Check cost at scale ---------------------------------------------------------------------


class ScaleFixture:
    """Hash maps full of entries and programs, held by this process."""

    def __init__(self, maps: int, entries: int, programs: int):
        self.map_fds: list[int] = []
        self.prog_fds: list[int] = []
        keys = b''.join(struct.pack('<I', i) for i in range(entries))
        values = bytes(8 * entries)
        tag = uuid.uuid4().hex[:4]
        for i in range(maps):
            fd = map_create(MAP_HASH, f'bench{tag}_{i}', 4, 8, entries)
            self.map_fds.append(fd)
            map_update_batch(fd, keys, values, entries)
        for i in range(programs):
            self.prog_fds.append(prog_load(PROG_SOCKET_FILTER, f'bench{tag}_p{i}', RETURN_ZERO))

    def close(self) -> None:
        for fd in self.map_fds + self.prog_fds:
            os.close(fd)
        self.map_fds, self.prog_fds = [], []


def timed(function, runs: int) -> tuple[dict, object]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - started) * 1000)
    return summary(times), result


def bench_scale(results: Results, maps: int, entries: int, programs: int, factor_cap: int) -> None:
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    # Our way on kernels without the counting kfunc (5.9 to 6.5): one loaded program walks each map.
    stats_probe.WITHHELD_ITERATORS = frozenset({'list_maps_count'})
    try:
        walker = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    finally:
        stats_probe.WITHHELD_ITERATORS = frozenset()
    metrics = StatsMetrics(MetricOptions(own_pid=-1, max_programs=10**6, max_maps=10**6))
    try:
        ours_by_factor = {}
        available = _mem_available_bytes()
        # Preallocated hash elements take ~70 bytes each with a 4-byte key and an 8-byte value.
        factor = max(1, min(factor_cap, int(available * 0.5 // (maps * entries * 72))))
        for scale in (1, factor) if factor > 1 else (1,):
            per_map = entries * scale
            total = maps * per_map
            say(f'scale: {maps} hash maps x {per_map:,} entries ({total:,}) and {programs} programs')
            fixture = ScaleFixture(maps, per_map, programs)
            try:
                label = f'{total / 1e6:g} M entries'

                def ours():
                    snapshot = probe.snapshot()
                    metrics.points(snapshot)
                    return snapshot

                ours_ms, snapshot = timed(ours, 15)
                objects = len(snapshot.maps) + len(snapshot.programs)
                counted = sum(m.entries or 0 for m in snapshot.maps if m.entries_method == 'iterator')
                assert counted >= total, (counted, total)
                ours_by_factor[scale] = ours_ms
                results.add(
                    Row('2. scale', f'ours: all stats of {objects} objects, {label}', 'ms', ours_ms,
                        goal='<= 50 ms', met=ours_ms['median'] <= 50)
                )  # fmt: skip

                def for_each_with_load(fds=tuple(fixture.map_fds)):
                    return sum(_count_with_a_fresh_program(fd) for fd in fds)

                for_each_load_ms, n = timed(for_each_with_load, 3)
                assert n == total, (n, total)
                preloaded = _preload_for_each(fixture.map_fds)
                try:

                    def for_each_runs(programs=tuple(preloaded)):
                        return sum(libbpf.prog_test_run(fd) for _obj, fd in programs)

                    for_each_ms, n = timed(for_each_runs, 5)
                    assert n == total, (n, total)
                finally:
                    for obj, _fd in preloaded:
                        obj.close()

                def batch_walk(fds=tuple(fixture.map_fds)):
                    return sum(EntryCounter.count_batch(fd, libbpf.map_info(fd)) or 0 for fd in fds)

                batch_ms, n = timed(batch_walk, 3)
                assert n == total, (n, total)

                def without_kfunc(fds=tuple(fixture.map_fds)):
                    return sum(walker._counter.count(fd, libbpf.map_info(fd))[0] or 0 for fd in fds)

                without_kfunc_ms, n = timed(without_kfunc, 3)
                assert n == total, (n, total)
                results.add(
                    Row('2. scale', f'ours without the kfunc (5.9-6.5: element iterator, for_each for large maps), '
                        f'{label}', 'ms', without_kfunc_ms)
                )  # fmt: skip
                results.add(Row('2. scale', f'for_each + test run, programs preloaded, {label}', 'ms', for_each_ms))
                results.add(Row('2. scale', f'for_each + test run, load per map, {label}', 'ms', for_each_load_ms))
                results.add(Row('2. scale', f'BPF_MAP_LOOKUP_BATCH walk, {label}', 'ms', batch_ms))
                ratio = for_each_ms['median'] / ours_ms['median']
                results.add(
                    Row('2. scale', f'for_each (preloaded) / ours, {label}', 'x', value=ratio,
                        goal='>= 10x at 10 M' if scale == 1 else '', met=ratio >= 10 if scale == 1 else None)
                )  # fmt: skip
                ratio = batch_ms['median'] / ours_ms['median']
                results.add(
                    Row('2. scale', f'batch walk / ours, {label}', 'x', value=ratio,
                        goal='>= 100x at 10 M' if scale == 1 else '', met=ratio >= 100 if scale == 1 else None)
                )  # fmt: skip
            finally:
                fixture.close()
                time.sleep(0.5)  # let the kernel free the maps before the next size
        if factor > 1:
            ratio = ours_by_factor[factor]['median'] / ours_by_factor[1]['median']
            results.add(
                Row('2. scale', f'ours at {factor}x entries / ours at 1x', 'x', value=ratio, goal='<= 1.2x',
                    met=ratio <= 1.2)
            )  # fmt: skip
        else:
            results.add(Row('2. scale', 'ours at 10x entries', '', note='not enough memory for more entries'))
    finally:
        probe.close()
        walker.close()


def _mem_available_bytes() -> int:
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    return 0


def _for_each_program(map_fd: int) -> libbpf.BpfObject:
    """The peers' counting program (bpf_for_each_map_elem), loaded for one map."""
    obj = libbpf.BpfObject(str(bpf_file(MAP_COUNT_OBJECT)))
    obj.map('count_target').reuse_fd(map_fd)
    obj.load()
    return obj


def _preload_for_each(map_fds: list[int]) -> list[tuple[libbpf.BpfObject, int]]:
    """The best case of the for_each method: one counting program per map, loaded beforehand."""
    loaded = [_for_each_program(fd) for fd in map_fds]
    return [(obj, obj.program_fd('count_with_for_each')) for obj in loaded]


def _count_with_a_fresh_program(fd: int) -> int:
    """The peers' way: a counting program loaded (and verified) for the map, each time."""
    obj = _for_each_program(fd)
    try:
        return libbpf.prog_test_run(obj.program_fd('count_with_for_each'))
    finally:
        obj.close()


# --- 3. One check run, idle host ----------------------------------------------------------------


def bench_check_run(results: Results, runs: int) -> None:
    say(f'one check run, idle host: {runs} runs')
    check = EbpfProbeCheck('ebpf_probe', {}, [{}])
    try:
        check.run()  # loads both probes
        time.sleep(0.3)
        check.run()  # first run with run-time deltas
        wall, cpu = [], []
        for _ in range(runs):
            aggregator.reset()
            cpu0, wall0 = thread_cpu_seconds(), time.perf_counter()
            error = check.run()
            wall.append((time.perf_counter() - wall0) * 1000)
            cpu.append((thread_cpu_seconds() - cpu0) * 1000)
            assert not error, error
        cpu_s = summary(cpu)
        results.add(Row('3. check run', 'wall time of run() (OOM kills + eBPF stats)', 'ms', summary(wall)))
        results.add(Row('3. check run', 'CPU time of run() (user + system)', 'ms', cpu_s, goal='<= 20 ms',
                        met=cpu_s['median'] <= 20))  # fmt: skip
        share = cpu_s['median'] / 15000 * 100
        results.add(Row('3. check run', 'share of one core at a 15 s interval', '%', value=share, goal='< 0.2 %',
                        met=share < 0.2))  # fmt: skip
    finally:
        check.cancel()
        aggregator.reset()


# --- 4. OOM burst -------------------------------------------------------------------------------


def bench_oom_burst(results: Results, kills: int, workers: int, bursts: int) -> None:
    say(f'OOM burst: {bursts} x {kills} OOM kills in {workers} memory cgroups between two check runs')
    victim = build_c('oom_victim.c', 'oom_victim')
    # Room for the whole burst in the kernel (the default holds 512 between two runs).
    check = EbpfProbeCheck('ebpf_probe', {}, [{'max_buffered_oom_kills': max(512, 2 * kills)}])
    cgroups = [MemoryCgroup(limit_mb=8, prefix='ebpf-probe-bench') for _ in range(workers)]
    run_ms, burst_s, exact, events = [], [], [], []
    # The check turns run-time statistics on for a window of each interval only: the bench holds
    # them on itself to read the program's own cost per kill.
    stats_fd = libbpf.enable_stats()
    try:
        check.run()
        for _ in range(bursts):
            aggregator.reset()
            pids, seconds = _burst(victim, cgroups, kills)
            burst_s.append(seconds)
            started = time.perf_counter()
            error = check.run()
            run_ms.append((time.perf_counter() - started) * 1000)
            assert not error, error
            # An event per kill up to max_oom_kill_events, one summary event for the rest of the storm.
            single = [e for e in aggregator.events if e['msg_title'].startswith('OOM kill: ')]
            storms = [e for e in aggregator.events if e['msg_title'].startswith('OOM kill storm: ')]
            reported = {int(e['msg_title'].rsplit('pid ', 1)[1].rstrip(')')) for e in single}
            summarized = sum(int(e['msg_title'].split()[3]) for e in storms)
            counted = sum(m.value for m in aggregator.metrics('ebpf_probe.oom_kill.count'))
            dropped = sum(m.value for m in aggregator.metrics('ebpf_probe.oom_kill.dropped'))
            events.append(len(aggregator.events))
            exact.append(
                reported <= set(pids)
                and len(reported) + summarized == counted == len(pids) == kills
                and len(storms) <= 1
                and dropped == 0
            )
        results.add(Row('4. OOM burst', f'{kills} kills caused, {bursts} times', 's', summary(burst_s)))
        results.add(Row('4. OOM burst', 'every kill reported once, none dropped', '', value=sum(exact),
                        note=f'bursts out of {bursts}', goal=f'all {kills}', met=all(exact)))  # fmt: skip
        results.add(Row('4. OOM burst', 'events sent by that run', '', summary(events), goal='<= 26',
                        note='25 kills, then one summary event', met=max(events) <= 26))  # fmt: skip
        times = summary(run_ms)
        results.add(Row('4. OOM burst', 'time of the run that reports them', 'ms', times, goal='<= 100 ms',
                        met=times['median'] <= 100))  # fmt: skip
        results.add(Row('4. OOM burst', 'run time per kill', 'us', value=round(times['median'] * 1000 / kills, 1)))
        per_kill = program_ns_per_run('mark_victim_btf')
        if per_kill is not None:
            results.add(Row('4. OOM burst', "BPF program's run time per kill (bpf stats)", 'ns', value=per_kill))
    finally:
        os.close(stats_fd)
        check.cancel()
        aggregator.reset()
        for cg in cgroups:
            cg.remove()


def _burst(victim: Path, cgroups: list[MemoryCgroup], kills: int) -> tuple[list[int], float]:
    """`kills` OOM kills spread over the cgroups, in parallel; the victims' pids and the time it took."""
    pids: list[int] = []
    lock = threading.Lock()

    def work(cgroup: MemoryCgroup, count: int) -> None:
        for _ in range(count):
            proc = subprocess.Popen([str(victim), f'{cgroup.dir}/cgroup.procs', 'bench-victim'])
            proc.wait()
            assert proc.returncode == -9, proc.returncode
            with lock:
                pids.append(proc.pid)

    share = [kills // len(cgroups) + (1 if i < kills % len(cgroups) else 0) for i in range(len(cgroups))]
    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(cg, n)) for cg, n in zip(cgroups, share, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pids, time.perf_counter() - started


# --- 5. Memory over time ------------------------------------------------------------------------


def bench_memory(results: Results, checkpoints: tuple[int, ...]) -> None:
    say(f'memory over time: {checkpoints[-1]} runs with maps created and freed between runs')
    check = EbpfProbeCheck('ebpf_probe', {}, [{}])
    churn: list[int] = []
    rss = {}
    try:
        for run in range(1, checkpoints[-1] + 1):
            for fd in churn:
                os.close(fd)
            churn = [map_create(MAP_HASH, f'churn{run}_{i}', 4, 8, 64) for i in range(5)]
            aggregator.reset()  # the Agent takes the submissions away; the stub would keep them
            error = check.run()
            assert not error, error
            if run in checkpoints:
                gc.collect()
                rss[run] = status_kb('VmRSS') / 1024
        for run in checkpoints:
            results.add(Row('5. memory', f'RSS after {run:,} runs', 'MB', value=rss[run]))
        growth = rss[checkpoints[-1]] - rss[checkpoints[0]]
        results.add(Row('5. memory', f'growth from run {checkpoints[0]} to run {checkpoints[-1]:,}', 'MB',
                        value=growth, goal='< 2 MB', met=growth < 2))  # fmt: skip
    finally:
        for fd in churn:
            os.close(fd)
        check.cancel()
        aggregator.reset()


# --- 6. Bundled libbpf --------------------------------------------------------------------------


def bench_bundled_libbpf(results: Results, runs: int) -> None:
    """The wheel's own libbpf.so.1 against the host's: the wheel it makes, start-up time and RSS."""
    say(f'bundled libbpf vs the host libbpf.so.1: the wheel, {runs} fresh processes per library')
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([PYTHON, '-m', 'build', '--wheel', '--outdir', out, str(REPO)], check=True, capture_output=True)
        [wheel] = Path(out).glob('*.whl')
        results.add(Row('6. bundled libbpf', f'wheel size ({wheel.name.split("-", 2)[2]})', 'kB',
                        value=wheel.stat().st_size / 1024))  # fmt: skip
    results.add(Row('6. bundled libbpf', 'libbpf.so.1 size (libelf and zlib inside)', 'kB',
                    value=libbpf.BUNDLED_LIBBPF.stat().st_size / 1024))  # fmt: skip
    bundled, host = [], []
    for _ in range(runs):  # interleaved
        bundled.append(run_child([PYTHON, '-m', 'benchmarks.startup_child', 'core']))
        host.append(run_child([PYTHON, '-m', 'benchmarks.startup_child', 'core-host-libbpf']))
    figures = {}
    for name, rows in (('bundled', bundled), ('host', host)):
        label = f'{name} libbpf {rows[0]["libbpf"]}'
        figures[name] = (
            summary([r['ms'] for r in rows]),
            summary([(r['rss_after_kb'] - r['rss_before_kb']) / 1024 for r in rows]),
        )
        results.add(Row('6. bundled libbpf', f'CO-RE start-up, {label}', 'ms', figures[name][0]))
        results.add(Row('6. bundled libbpf', f'CO-RE: RSS added, {label}', 'MB', figures[name][1]))
    for i, what in ((0, 'start-up time'), (1, 'RSS added')):
        ratio = figures['bundled'][i]['median'] / figures['host'][i]['median']
        results.add(Row('6. bundled libbpf', f'bundled / host {what}', 'x', value=ratio, goal='<= 1.1x',
                        met=ratio <= 1.1))  # fmt: skip


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--quick', action='store_true', help='fewer runs and smaller sizes (a smoke test)')
    parser.add_argument('--output', default=str(REPO / 'benchmarks' / 'results' / 'latest.json'))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print('make bench must run as root: it loads BPF programs and causes OOM kills', file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    libbpf.lib()
    results = Results()
    results.context = {
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'kernel': os.uname().release,
        'cpus': os.cpu_count(),
        'python': sys.version.split()[0],
        'libbpf': libbpf_version(),
        'quick': args.quick,
    }
    started = time.monotonic()
    if args.quick:
        bench_startup(results, runs=3)
        bench_scale(results, maps=20, entries=5_000, programs=10, factor_cap=2)
        bench_check_run(results, runs=10)
        bench_oom_burst(results, kills=20, workers=2, bursts=2)
        bench_memory(results, checkpoints=(1, 10, 50))
        bench_bundled_libbpf(results, runs=3)
        bench_owners(results, processes=2, fds_each=10_000, runs=10)
        bench_runtime_statistics(results, seconds=10, interval=2, runs=1000, period=0.01)
        bench_many_objects(results, maps=400, programs=200, runs=5)
        bench_kill_signals(results, seconds=1, turns=3)
    else:
        bench_startup(results, runs=9)
        bench_scale(results, maps=200, entries=50_000, programs=100, factor_cap=10)
        bench_check_run(results, runs=50)
        bench_oom_burst(results, kills=1000, workers=4, bursts=3)
        bench_memory(results, checkpoints=(1, 100, 1000))
        bench_bundled_libbpf(results, runs=9)
        bench_owners(results, processes=11, fds_each=18_200, runs=50)
        bench_runtime_statistics(results, seconds=60, interval=15, runs=1000, period=0.01)
        bench_many_objects(results, maps=2000, programs=1000, runs=30)
        bench_kill_signals(results, seconds=3, turns=7)
    results.context['duration_s'] = round(time.monotonic() - started, 1)
    table = results.markdown()
    print(table)
    output = Path(args.output)
    results.write_json(output)
    say(f'{len(results.rows)} figures in {results.context["duration_s"]} s; JSON: {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
