# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""`make bench`, the cost on busy hosts: open files, run-time statistics, thousands of objects.

7. owners: a check run on a quiet host and with 200,000 more open files; a run that has to look
   for the owner of a new object; bpftool's full fd scan per call.
8. run-time statistics: a program run at a steady rate under no statistics, statistics always on
   (the check's previous default, bpftop's way) and the check's sampled windows: what each costs
   the program per run, and the figures the check reports in the last two.
9. thousands of objects: 2,000 maps and 1,000 programs held by another process: a steady run,
   the first run that sees them, the object-by-object way (the previous design, bpftool's), and
   the submissions a run makes.
10. kill signals: the OOM probe's signal hook sees every signal on the host; two processes passing
   a signal back and forth as fast as they can, without the probe and with it, turn by turn.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from datadog_checks.base.stubs import aggregator
from datadog_checks.ebpf_probe import EbpfProbeCheck
from datadog_checks.ebpf_probe.ebpf_stats import probe as stats_probe
from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe
from tests.bpf_syscalls import map_create, prog_load, prog_test_run_timed
from tests.seams import OwnerScans, StatisticsWindows

from .common import PYTHON, REPO, Results, Row, build_c, program_ns_per_run, summary

MAP_HASH = 1
PROG_SOCKET_FILTER = 1
RETURN_ZERO = bytes.fromhex('b700000000000000') + bytes.fromhex('9500000000000000')


def say(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


class Holder:
    """A child process holding open files and BPF objects (benchmarks/holder.py)."""

    def __init__(self, **counts: int):
        args = [PYTHON, '-m', 'benchmarks.holder']
        for option, value in counts.items():
            args += [f'--{option.replace("_", "-")}', str(value)]
        self._proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the holder failed (exit {self._proc.wait()})')
        self.description = json.loads(line)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)


def holders(count: int, **each: int) -> list[Holder]:
    started: list[Holder] = []
    try:
        for _ in range(count):
            started.append(Holder(**each))
    except BaseException:
        for holder in started:
            holder.close()
        raise
    return started


class Runs:
    """`runs` check runs: wall and CPU time (ms), and the metric submissions of each.

    CPU time (user + system of the thread, kernel iterators included) is the check's own cost; wall
    time also holds the waits for a CPU on a busy machine.
    """

    def __init__(self, check: EbpfProbeCheck, runs: int, before: Callable[[], None] | None = None):
        wall, cpu, self.submissions = [], [], []
        for _ in range(runs):
            if before is not None:
                before()
            aggregator.reset()
            started, cpu_started = time.perf_counter(), time.thread_time()
            error = check.run()
            cpu.append((time.thread_time() - cpu_started) * 1000)
            wall.append((time.perf_counter() - started) * 1000)
            assert not error, error
            self.submissions.append(sum(len(points) for points in aggregator._metrics.values()))
        self.wall, self.cpu = summary(wall), summary(cpu)


def new_check(instance: dict | None = None) -> EbpfProbeCheck:
    check = EbpfProbeCheck('ebpf_probe', {}, [instance or {}])
    check.run()  # loads the probes
    time.sleep(0.5)  # libbpf's feature-probe objects are freed a grace period later
    check.run()
    return check


def runs_of_a_new_check(runs: int, instance: dict | None = None) -> Runs:
    """`runs` runs of a check of their own (beside the bench's), cancelled after."""
    check = new_check(instance)
    try:
        return Runs(check, runs)
    finally:
        check.cancel()
        aggregator.reset()


# --- 7. Owners --------------------------------------------------------------------------------------


def bench_owners(results: Results, processes: int, fds_each: int, runs: int) -> None:
    total = processes * fds_each
    say(f'owners: check runs on a quiet host, then with {total:,} more open files in {processes} processes')
    check = new_check()
    busy: list[Holder] = []
    patches = pytest.MonkeyPatch()
    walks = OwnerScans(patches)
    try:
        quiet = Runs(check, runs)
        busy = holders(processes, fds=fds_each)
        scans = walks.count
        steady = Runs(check, runs)
        steady_scans = walks.count - scans
        made: list[int] = []

        def a_new_map() -> None:  # a new object: its owner is needed at once, so the run scans
            for fd in made:
                os.close(fd)
            made[:] = [map_create(MAP_HASH, 'bench_new', 4, 8, 4)]

        looking = Runs(check, max(3, runs // 5), before=a_new_map)
        for fd in made:
            os.close(fd)
    finally:
        patches.undo()
        for holder in busy:
            holder.close()
        check.cancel()
        aggregator.reset()
    section = '7. owners'
    label = f'+{total / 1000:.0f}k open files'
    results.add(Row(section, 'check run, quiet host (OOM kills + eBPF stats): wall', 'ms', quiet.wall))
    results.add(Row(section, 'check run, quiet host: CPU', 'ms', quiet.cpu))
    results.add(Row(section, f'check run, {label}, no object created or freed: wall', 'ms', steady.wall,
                    note=f'{steady_scans} fd scans in {runs} runs'))  # fmt: skip
    results.add(Row(section, f'check run, {label}, no object created or freed: CPU', 'ms', steady.cpu))
    for what, figure in (('CPU', 'cpu'), ('wall', 'wall')):
        ratio = getattr(steady, figure)['median'] / getattr(quiet, figure)['median']
        goal, met = ('<= 1.2x', ratio <= 1.2) if what == 'CPU' else ('', None)
        results.add(Row(section, f'{label} / quiet, {what}', 'x', value=ratio, goal=goal, met=met))
    results.add(Row(section, f'check run that finds the owner of a new map, {label} (one full fd scan): CPU', 'ms',
                    looking.cpu))  # fmt: skip
    # bpftool finds owners the same way, a task_file iterator pass per call (Debian's bpftool is
    # built without it: no pids in its output, nothing to time here).
    results.add(Row(section, f'a full fd scan every run (the previous design, bpftool\'s way) / ours, {label}, CPU',
                    'x', value=looking.cpu['median'] / steady.cpu['median']))  # fmt: skip


# --- 8. Run-time statistics ---------------------------------------------------------------------------


class SteadyWorkload:
    """A socket filter run `runs` times every `period` seconds on a fixed schedule, in a thread.

    The kernel times each batch (BPF_PROG_TEST_RUN's duration): with run-time statistics on, that
    time includes their two clock reads per run, the tax every program on the host pays. Each batch
    also tells whether the kernel counted its runs (statistics were on), and whether the check's
    window was open meanwhile (`window_open`, when set): runs counted outside the check's windows
    paid for someone else's statistics (other processes on a shared machine).
    """

    def __init__(self, runs: int, period: float):
        from datadog_checks.ebpf_probe.kernel import libbpf

        self._libbpf = libbpf
        self.fd = prog_load(PROG_SOCKET_FILTER, 'bench_steady', RETURN_ZERO)
        self._runs, self._period = runs, period
        self._lock = threading.Lock()
        self.total_runs = 0
        self.window_open: Callable[[], bool] | None = None
        self._reset()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _reset(self) -> None:
        self._ns = 0  # kernel-timed ns, summed over batches
        self._measured_runs = 0
        self._paid_in_window = 0  # runs counted while the check's window was open
        self._paid_elsewhere = 0  # runs counted while it was not

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        deadline = time.monotonic()
        counted = self._libbpf.prog_info(self.fd).run_cnt
        while not self._stopping.is_set():
            window_open = self.window_open
            in_window = bool(window_open and window_open())
            per_run = prog_test_run_timed(self.fd, bytes(64), self._runs)
            in_window = in_window or bool(window_open and window_open())
            now_counted = self._libbpf.prog_info(self.fd).run_cnt
            with self._lock:
                self.total_runs += self._runs
                self._ns += per_run * self._runs
                self._measured_runs += self._runs
                if now_counted != counted:
                    if in_window:
                        self._paid_in_window += self._runs
                    else:
                        self._paid_elsewhere += self._runs
            counted = now_counted
            deadline += self._period
            delay = deadline - time.monotonic()
            if delay > 0:
                self._stopping.wait(delay)

    def take(self) -> tuple[float, int, int, int]:
        """(average kernel-timed ns per run, runs made, runs that paid in the check's windows, elsewhere),
        since the last call."""
        with self._lock:
            figures = (
                self._ns / self._measured_runs if self._measured_runs else float('nan'),
                self._measured_runs,
                self._paid_in_window,
                self._paid_elsewhere,
            )
            self._reset()
        return figures

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        self.stop()
        os.close(self.fd)


def _program_figures(program_tag: str) -> dict[str, float]:
    figures = {}
    for metric in ('run_count', 'run_time', 'average_run_time', 'cpu_usage'):
        points = [m.value for m in aggregator.metrics(f'ebpf_probe.program.{metric}') if program_tag in m.tags]
        if points:
            figures[metric] = sum(points)
    return figures


class Phase:
    """The workload for a while, with a check run every `interval` when an instance is given.

    paid: the share of the workload's runs the kernel counted while the check held statistics on
    (they paid the tax because of the check); paid_elsewhere: counted while it did not (someone
    else's statistics); intervals: (runs made, the check's figures, how the check saw run time
    counted) per check run.
    """

    def __init__(self, workload: SteadyWorkload, instance: dict | None, seconds: float, interval: float):
        self.intervals: list[tuple[int, dict[str, float], str | None]] = []
        self.windows, self.share_on = 0, 0.0
        check = None
        patches = pytest.MonkeyPatch()
        windows = StatisticsWindows(patches)
        workload.take()
        started = time.monotonic()
        try:
            if instance is not None:
                check = EbpfProbeCheck('ebpf_probe', {}, [{**instance, 'min_collection_interval': interval}])
                check.run()
                probe = check._ebpf_stats.probe
                # Is the check's BPF_ENABLE_STATS fd open now (held, or a window of the sampler)?
                workload.window_open = lambda: getattr(probe._run_time, '_fd', None) is not None
            made_at_run = workload.total_runs
            next_run = started + interval
            while time.monotonic() < started + seconds:
                if check is None:
                    time.sleep(min(0.5, max(0.0, started + seconds - time.monotonic())))
                    continue
                time.sleep(max(0.0, next_run - time.monotonic()))
                next_run += interval
                aggregator.reset()
                assert not check.run()
                made = workload.total_runs
                probe = check._ebpf_stats.probe
                self.intervals.append((made - made_at_run, _program_figures('program_name:bench_steady'),
                                       probe.run_time_source))  # fmt: skip
                made_at_run = made
            if check is not None:
                self.windows = windows.opened
                self.share_on = windows.seconds / (time.monotonic() - started)
        finally:
            patches.undo()
            self.ns_per_run, made, in_window, elsewhere = workload.take()
            workload.window_open = None
            if check is not None:
                check.cancel()
            aggregator.reset()
        self.paid = in_window / made if made else float('nan')
        self.paid_elsewhere = elsewhere / made if made else float('nan')

    def figures(self, metric: str, sources: tuple[str, ...]) -> list[float]:
        return [f[metric] for _made, f, source in self.intervals if metric in f and source in sources]


def bench_runtime_statistics(results: Results, seconds: float, interval: float, runs: int, period: float) -> None:
    say(f'run-time statistics: a program run {runs / period:,.0f} times a second; {seconds:.0f} s with none, '
        f'with statistics always on, with the check at its defaults (a run every {interval:g} s)')  # fmt: skip
    workload = SteadyWorkload(runs, period)
    workload.start()
    try:
        time.sleep(1)
        none = Phase(workload, None, seconds, interval)
        always = Phase(workload, {'program_runtime_sampling': 1}, seconds, interval)
        ours = Phase(workload, {}, seconds, interval)
    finally:
        workload.close()
    section = '8. run-time statistics'
    others = max(none.paid_elsewhere, always.paid_elsewhere, ours.paid_elsewhere)
    results.add(Row(section, 'no statistics: ns per run of the program (kernel-timed)', 'ns', value=none.ns_per_run))
    results.add(Row(section, 'statistics always on (previous default, bpftop): ns per run', 'ns',
                    value=always.ns_per_run))  # fmt: skip
    results.add(Row(section, f'check at defaults ({ours.windows} windows, on {ours.share_on:.1%} of the time): '
                    'ns per run', 'ns', value=ours.ns_per_run))  # fmt: skip
    # The tax is two clock reads on every run made while statistics are on: the runs the kernel
    # counted while the check held them are the runs that paid it because of the check.
    results.add(Row(section, "runs that paid for the check's statistics, always on", '%', value=100 * always.paid))
    results.add(Row(section, 'runs that paid for the check\'s statistics, check at defaults', '%',
                    value=100 * ours.paid))  # fmt: skip
    ratio = ours.paid / always.paid
    results.add(Row(section, 'tax of the check / tax of always on, over a minute of check runs (runs that paid)',
                    'x', value=ratio, goal='<= 0.1x', met=ratio <= 0.1))  # fmt: skip
    timed = (ours.ns_per_run - none.ns_per_run) / (always.ns_per_run - none.ns_per_run)
    results.add(Row(section, 'the same from kernel-timed ns per run: (defaults - none) / (always on - none)', 'x',
                    value=timed, note='other processes\' statistics blur it' if others > 0.01 else ''))  # fmt: skip
    if others > 0.001:
        results.add(Row(section, 'runs counted while the check held no statistics (other processes\' on)', '%',
                        value=100 * others, note='largest of the three phases'))  # fmt: skip
    external = sum(1 for *_, source in ours.intervals if source == 'external')
    if external:
        results.add(Row(section, 'intervals another process had statistics on (reported raw, left out below)', '',
                        value=external))  # fmt: skip
    for metric, label in (('run_count', 'runs per interval'), ('average_run_time', 'average run time'),
                          ('cpu_usage', 'CPU usage')):  # fmt: skip
        exact = always.figures(metric, ('held',))
        sampled = ours.figures(metric, ('sampled',))
        if not exact or not sampled:
            results.add(Row(section, f'{label}: sampled / always on', '', note='no figures'))
            continue
        ratio = statistics.mean(sampled) / statistics.mean(exact)
        results.add(Row(section, f'{label}: sampled / always on (means over the minute)', 'x', value=ratio,
                        goal='0.9x to 1.1x', met=0.9 <= ratio <= 1.1))  # fmt: skip
    errors = [abs(f['run_count'] - made) / made for made, f, source in ours.intervals
              if 'run_count' in f and source == 'sampled' and made]  # fmt: skip
    if errors:
        results.add(Row(section, 'sampled runs per interval against the runs made: largest error', '%',
                        value=100 * max(errors)))  # fmt: skip


# --- 9. Thousands of objects ------------------------------------------------------------------------------


def bench_many_objects(results: Results, maps: int, programs: int, runs: int) -> None:
    objects = maps + programs
    say(f'thousands of objects: {maps:,} maps and {programs:,} programs held by another process')
    section = '9. many objects'
    label = f'{maps:,} maps + {programs:,} programs'
    holder = None
    check = new_check()
    try:
        holder = Holder(maps=maps, programs=programs)
        first = Runs(check, 1)
        steady = Runs(check, runs)
        check.cancel()
        aggregator.reset()
        results.add(Row(section, f'first run that sees {label} (an fd per map once, for its memory): CPU', 'ms',
                        first.cpu))  # fmt: skip
        results.add(Row(section, f'check run, {label}: wall', 'ms', steady.wall))
        results.add(Row(section, f'check run, {label}: CPU', 'ms', steady.cpu, goal='<= 30 ms',
                        met=steady.cpu['median'] <= 30))  # fmt: skip
        per_object = steady.cpu['median'] * 1000 / objects
        # Submissions are bounded by the series limits, not by the objects: the goal is for thousands.
        goal, met = ('<= 10 us', per_object <= 10) if objects >= 3000 else ('', None)
        results.add(Row(section, 'CPU per object', 'us', value=per_object, goal=goal, met=met))
        results.add(Row(section, 'metric submissions per run (series limits 200 + 200, the defaults)', '',
                        value=statistics.median(steady.submissions)))  # fmt: skip
        # The check's own work, submissions left out: what a run costs beside what it submits.
        bare_runs = runs_of_a_new_check(runs, {'max_programs_reported': 0, 'max_maps_reported': 0})
        results.add(Row(section, f'check run, {label}, no per-object series (totals only): CPU', 'ms', bare_runs.cpu,
                        note=f'{statistics.median(bare_runs.submissions):,.0f} submissions'))  # fmt: skip
        # With the previous series limits, and object by object (bpftool's way, the previous design).
        wide_runs = runs_of_a_new_check(runs, {'max_programs_reported': 500, 'max_maps_reported': 500})
        wide_submissions = statistics.median(wide_runs.submissions)
        results.add(Row(section, f'check run, {label}, series limits 500 + 500 (the previous defaults): CPU', 'ms',
                        wide_runs.cpu, note=f'{wide_submissions:,.0f} submissions'))  # fmt: skip
        stats_probe.WITHHELD_ITERATORS = frozenset({'list_programs', 'list_maps', 'program_stats'})
        try:
            slow_runs = runs_of_a_new_check(max(3, runs // 3))
        finally:
            stats_probe.WITHHELD_ITERATORS = frozenset()
        results.add(Row(section, f'check run, {label}, object by object (get-next-id, fd, info, fdinfo): CPU', 'ms',
                        slow_runs.cpu))  # fmt: skip
        results.add(Row(section, 'object by object / ours, CPU', 'x',
                        value=slow_runs.cpu['median'] / steady.cpu['median']))  # fmt: skip
        holder.close()
        # The same with a link per program: what attachments cost (each link is read once).
        check = new_check()
        holder = Holder(maps=maps, programs=programs, links=1)
        first_linked = Runs(check, 1)
        linked = Runs(check, runs)
        check.cancel()
        aggregator.reset()
        results.add(Row(section, f'first run that sees {label}, each program with a link (every link read once): '
                        'CPU', 'ms', first_linked.cpu))  # fmt: skip
        results.add(Row(section, f'check run, {label}, each program with a link: CPU', 'ms', linked.cpu,
                        note=f'{statistics.median(linked.submissions):,.0f} submissions'))  # fmt: skip
        ratio = linked.cpu['median'] / steady.cpu['median']
        results.add(Row(section, 'with a link per program / without, CPU', 'x', value=ratio, goal='<= 1.2x',
                        met=ratio <= 1.2))  # fmt: skip
    finally:
        check.cancel()
        if holder is not None:
            holder.close()


# --- 10. Kill signals -------------------------------------------------------------------------------


def bench_kill_signals(results: Results, seconds: float, turns: int) -> None:
    say(f'kill signals: {turns} turns of {seconds:g} s of signal ping-pong without the OOM probe, then with it')
    pingpong = build_c('signal_pingpong.c', 'signal_pingpong')

    def rates() -> tuple[float, float]:
        """Signals a second of wall time, and of the ping-pong's CPU time."""
        out = subprocess.run([str(pingpong), str(seconds)], check=True, capture_output=True, text=True).stdout
        wall, cpu = out.split()
        return float(wall), float(cpu)

    without: list[tuple[float, float]] = []
    with_probe: list[tuple[float, float]] = []
    log = logging.getLogger('bench')
    probe = None
    for _ in range(turns):
        without.append(rates())
        probe = load_oom_kill_probe(OOMKillProbeOptions(), log)
        try:
            assert probe.signal_hook, probe.limitations
            with_probe.append(rates())
        finally:
            probe.close()
    # One more turn with run-time statistics on, for the program's own time per signal (not in the
    # rates above: statistics add their own tax to every run).
    probe = load_oom_kill_probe(OOMKillProbeOptions(), log)
    stats = libbpf.enable_stats()
    try:
        rates()
        ns_per_signal = program_ns_per_run('signal_generate')
    finally:
        os.close(stats)
        probe.close()
    section = '10. kill signals'
    for i, clock in ((0, 'wall'), (1, 'CPU')):
        before, after = [r[i] for r in without], [r[i] for r in with_probe]
        results.add(Row(section, f'signals a second of {clock} time, no probe', '/s', summary(before)))
        results.add(Row(section, f'signals a second of {clock} time, the OOM probe loaded (its hook on every signal)',
                        '/s', summary(after)))  # fmt: skip
        ratio = statistics.median(after) / statistics.median(before)
        if clock == 'CPU':  # waits for a CPU on a shared machine are not in it: the figure held to the goal
            results.add(Row(section, f'with the probe / without, {clock} time', 'x', value=ratio, goal='>= 0.95',
                            met=ratio >= 0.95))  # fmt: skip
        else:
            results.add(Row(section, f'with the probe / without, {clock} time', 'x', value=ratio))
    results.add(Row(section, "the hook's own time per signal (kernel-timed)", 'ns', value=ns_per_signal))
    share = ns_per_signal * statistics.median([r[1] for r in with_probe]) / 1e9
    results.add(Row(section, "the hook's time / a signal's CPU time", '%', value=100 * share, goal='< 5 %',
                    met=share < 0.05))  # fmt: skip
