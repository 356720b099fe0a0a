# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel's count of OOM kills against the kills reported: the bookkeeping, with a fake kernel counter."""

import json

import pytest

from datadog_checks.ebpf_probe.oom_kill.unaccounted import CACHE_KEY, UnaccountedKills, kernel_oom_kills

pytestmark = pytest.mark.unit


class Kernel:
    def __init__(self, kills=0, boot='boot-1'):
        self.kills = kills
        self.boot = boot


def unaccounted_kills(kernel: Kernel, cache: dict) -> UnaccountedKills:
    return UnaccountedKills(cache.get, cache.__setitem__, lambda: kernel.kills, lambda: kernel.boot)


def run(kills: UnaccountedKills, kernel: Kernel, reported: int = 0, kills_during_the_drain: int = 0):
    """One check run: the kernel's count, then the drain (kills may land in between), then the account."""
    kills.count()
    kernel.kills += kills_during_the_drain
    return kills.reconcile(reported)


def test_a_first_run_counts_nothing_from_before_it():
    kernel, cache = Kernel(kills=57), {}
    reconciliation = run(unaccounted_kills(kernel, cache), kernel)
    assert (reconciliation.unaccounted, reconciliation.over_reported, reconciliation.since_restart) == (0, 0, False)
    assert json.loads(cache[CACHE_KEY]) == {'boot_id': 'boot-1', 'oom_kill': 57}


def test_every_reported_kill_balances_one_the_kernel_counted():
    kernel, cache = Kernel(), {}
    book = unaccounted_kills(kernel, cache)
    run(book, kernel)
    kernel.kills += 3
    assert run(book, kernel, reported=3).unaccounted == 0
    kernel.kills += 2
    assert run(book, kernel, reported=1).unaccounted == 0  # held a run: its record may be on its way
    assert run(book, kernel).unaccounted == 1  # it never came: one the probe never saw
    assert run(book, kernel).unaccounted == 0


def test_kills_while_the_check_was_stopped_are_counted_on_restart_once():
    kernel, cache = Kernel(kills=10), {}
    run(unaccounted_kills(kernel, cache), kernel)
    kernel.kills += 2  # the Agent is restarting
    restarted = unaccounted_kills(kernel, cache)
    reconciliation = run(restarted, kernel)
    assert (reconciliation.unaccounted, reconciliation.since_restart) == (2, True)
    again = run(restarted, kernel)
    assert (again.unaccounted, again.since_restart) == (0, False)


def test_after_a_reboot_the_kills_of_the_new_boot_are_counted():
    kernel, cache = Kernel(kills=40), {}
    run(unaccounted_kills(kernel, cache), kernel)
    rebooted = Kernel(kills=3, boot='boot-2')
    reconciliation = run(unaccounted_kills(rebooted, cache), rebooted)
    assert reconciliation.unaccounted == 3


def test_a_kill_reported_before_the_kernel_counts_it_is_carried_not_doubled():
    """The kprobe paths write the record before the kernel's counter moves."""
    kernel, cache = Kernel(), {}
    book = unaccounted_kills(kernel, cache)
    run(book, kernel)
    first = run(book, kernel, reported=1, kills_during_the_drain=1)  # counted just after the count was read
    assert (first.unaccounted, first.over_reported) == (0, 0)
    second = run(book, kernel)
    assert (second.unaccounted, second.over_reported) == (0, 0)


def test_a_kill_counted_before_its_record_comes_is_neither_unaccounted_nor_over_reported():
    """The tracepoints: the kernel's counter moves a moment before the record is written."""
    kernel, cache = Kernel(), {}
    book = unaccounted_kills(kernel, cache)
    run(book, kernel)
    kernel.kills += 1  # counted; its record comes after this run's drain
    first = run(book, kernel)
    assert (first.unaccounted, first.over_reported) == (0, 0)
    second = run(book, kernel, reported=1)  # the record, drained by the next run
    assert (second.unaccounted, second.over_reported) == (0, 0)
    assert (run(book, kernel).unaccounted, run(book, kernel).over_reported) == (0, 0)


def test_kills_while_no_probe_runs_are_unaccounted_at_once():
    kernel, cache = Kernel(), {}
    book = unaccounted_kills(kernel, cache)
    run(book, kernel)
    kernel.kills += 2
    book.count()
    assert book.reconcile(0, probe_running=False).unaccounted == 2


def test_a_kill_reported_that_the_kernel_never_counted_is_said():
    kernel, cache = Kernel(), {}
    book = unaccounted_kills(kernel, cache)
    run(book, kernel)
    assert run(book, kernel, reported=1).over_reported == 0  # maybe it comes next run
    assert run(book, kernel).over_reported == 1  # it did not


def test_a_kernel_without_the_counter_gives_no_account():
    book = UnaccountedKills({}.get, {}.__setitem__, lambda: None, lambda: 'b')
    book.count()
    assert book.reconcile(3) is None


def test_the_counter_is_read_from_vmstat(tmp_path):
    vmstat = tmp_path / 'vmstat'
    vmstat.write_text('nr_free_pages 100\noom_kill 7\nnr_dirty 1\n')
    assert kernel_oom_kills(str(vmstat)) == 7
    vmstat.write_text('nr_free_pages 100\n')
    assert kernel_oom_kills(str(vmstat)) is None
