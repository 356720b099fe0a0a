# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Ring buffers' fill level, against the buffer's own positions as its mmap shows them.

A BPF ring buffer maps its consumer position (a page, writable) and its producer position (the
next page, read-only) into user space: what is written and not read is producer - consumer.
"""

import logging
import mmap
import os
import struct

import pytest

from datadog_checks.ebpf_probe import EbpfProbeCheck
from datadog_checks.ebpf_probe.ebpf_stats import EbpfStatsOptions, EbpfStatsProbe
from datadog_checks.ebpf_probe.kernel import libbpf

from .bpf_objects import PROG_SOCKET_FILTER
from .bpf_syscalls import MAP_RINGBUF, map_create, prog_load, writes_to_ring_buffer

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures('root')]

log = logging.getLogger('test')
PAGE = os.sysconf('SC_PAGE_SIZE')
SIZE = 4 * PAGE  # a ring buffer's size: a power of two, a multiple of the page size
RECORD = 64  # bytes each program run writes, plus an 8-byte header in the buffer
HEADER = 8


class RingBuffer:
    """A ring buffer this process made, a program that writes to it, and its positions' pages."""

    def __init__(self, name: str):
        self.fd = map_create(MAP_RINGBUF, name, 0, 0, SIZE)
        self.id = libbpf.map_info(self.fd).id
        self.program = prog_load(PROG_SOCKET_FILTER, f'{name}_w', writes_to_ring_buffer(self.fd, RECORD))
        self.consumer_page = mmap.mmap(self.fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.producer_page = mmap.mmap(self.fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)

    def write(self, records: int) -> None:
        libbpf.prog_test_run(self.program, bytes(64), repeat=records)

    @property
    def consumer(self) -> int:
        return struct.unpack_from('<Q', self.consumer_page, 0)[0]

    @property
    def producer(self) -> int:
        return struct.unpack_from('<Q', self.producer_page, 0)[0]

    def consume_all(self) -> None:
        """What a consumer does when it has read every record: its position up to the producer's."""
        struct.pack_into('<Q', self.consumer_page, 0, self.producer)

    def close(self) -> None:
        self.consumer_page.close()
        self.producer_page.close()
        os.close(self.program)
        os.close(self.fd)


@pytest.fixture
def ring():
    ring = RingBuffer('fill_test')
    yield ring
    ring.close()


@pytest.fixture
def probe():
    probe = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    yield probe
    probe.close()


def ring_record(probe, ring):
    [record] = [m for m in probe.snapshot().maps if m.id == ring.id]
    return record


def test_the_fill_level_is_the_buffers_own_positions(ring, probe):
    assert ring_record(probe, ring).ring_buffer_used == 0
    ring.write(10)
    record = ring_record(probe, ring)
    assert ring.producer - ring.consumer == 10 * (RECORD + HEADER)  # the kernel wrote them all
    assert record.ring_buffer_used == ring.producer - ring.consumer
    assert record.max_entries == SIZE
    assert record.ring_buffer_fill == pytest.approx(10 * (RECORD + HEADER) / SIZE)


def test_a_buffer_no_one_reads_fills_up_and_empties_when_read(ring, probe):
    ring.write(10 * SIZE // (RECORD + HEADER))  # more than it holds: the rest is dropped
    record = ring_record(probe, ring)
    assert record.ring_buffer_used == ring.producer - ring.consumer
    assert SIZE - (RECORD + HEADER) < record.ring_buffer_used <= SIZE
    assert record.ring_buffer_fill > 0.95
    ring.consume_all()
    assert ring_record(probe, ring).ring_buffer_used == 0
    ring.write(3)
    assert ring_record(probe, ring).ring_buffer_used == 3 * (RECORD + HEADER) == ring.producer - ring.consumer


def test_maps_that_are_not_ring_buffers_have_no_fill_level(ring, probe):
    maps = probe.snapshot().maps
    assert all(m.ring_buffer_used is None for m in maps if m.type not in ('ringbuf', 'user_ringbuf'))
    assert all(m.ring_buffer_used is not None for m in maps if m.type == 'ringbuf')


def test_the_check_reports_every_ring_buffers_fill(dd_run_check, aggregator, ring):
    ring.write(SIZE // 2 // (RECORD + HEADER))
    used = ring.producer - ring.consumer
    # max_maps 1: ring buffers are reported whatever the limit.
    check = EbpfProbeCheck('ebpf_probe', {}, [{'collect_oom_kill': False, 'max_maps_reported': 1}])
    try:
        dd_run_check(check)
    finally:
        check.cancel()
    me = open('/proc/self/comm').read().strip()
    tags = ['map_name:fill_test', 'map_type:ringbuf', f'owner:{me}', 'ebpf_probe_self:true']  # made in this process
    aggregator.assert_metric('ebpf_probe.map.ring_buffer.used', value=used, count=1, tags=tags)
    aggregator.assert_metric('ebpf_probe.map.ring_buffer.fill', value=used / SIZE, count=1, tags=tags)


def test_object_by_object_the_fill_level_is_read_from_the_buffers_pages(ring, monkeypatch):
    from datadog_checks.ebpf_probe.ebpf_stats import probe as stats_probe

    monkeypatch.setattr(stats_probe, 'WITHHELD_ITERATORS', frozenset({'list_maps', 'list_maps_count'}))
    by_fd = EbpfStatsProbe.load(EbpfStatsOptions(), log)
    try:
        assert 'iter/bpf_map' not in by_fd.hooks
        ring.write(7)
        assert ring_record(by_fd, ring).ring_buffer_used == 7 * (RECORD + HEADER) == ring.producer - ring.consumer
    finally:
        by_fd.close()
