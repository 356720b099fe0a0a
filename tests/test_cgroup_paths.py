# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Cgroup ids to paths: a walk of a directory tree (a real one, made here), only for ids not seen."""

import os

import pytest

from datadog_checks.ebpf_probe.kernel.cgroups import CgroupPaths

pytestmark = pytest.mark.unit


class CountedWalks(CgroupPaths):
    walks = 0

    def _walk(self, root):
        type(self).walks += 1
        return CgroupPaths._walk(root)


def test_ids_are_paths_below_the_root_found_by_one_walk_and_kept(tmp_path):
    (tmp_path / 'system.slice' / 'cilium.service').mkdir(parents=True)
    (tmp_path / 'kubepods').mkdir()
    paths = CountedWalks(str(tmp_path))
    CountedWalks.walks = 0
    service = os.stat(tmp_path / 'system.slice' / 'cilium.service').st_ino
    kubepods = os.stat(tmp_path / 'kubepods').st_ino
    assert paths.paths([service, kubepods, os.stat(tmp_path).st_ino]) == {
        service: '/system.slice/cilium.service',
        kubepods: '/kubepods',
        os.stat(tmp_path).st_ino: '/',
    }
    assert CountedWalks.walks == 1
    assert paths.path(service) == '/system.slice/cilium.service' and CountedWalks.walks == 1


def test_an_id_no_walk_finds_is_not_walked_for_again_even_beside_others(tmp_path):
    paths = CountedWalks(str(tmp_path))
    CountedWalks.walks = 0
    for _ in range(3):  # two ids outside the view, asked every run: one walk each, once
        assert paths.path(10**12) is None
        assert paths.path(10**12 + 1) is None
    assert CountedWalks.walks == 2
    (tmp_path / 'new').mkdir()
    assert paths.path(os.stat(tmp_path / 'new').st_ino) == '/new'  # a new cgroup: walked for
    assert CountedWalks.walks == 3


def test_without_a_hierarchy_nothing_is_known():
    assert CgroupPaths(None).paths([1, 2]) == {1: None, 2: None}
