# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The wheel carries everything: installed in a clean venv, it runs without the source tree."""

import json
import subprocess
import zipfile

import pytest

from .package import REPO, build_wheel

SYSTEM_PYTHON = '/usr/bin/python3'  # the Python BCC's module is installed for

# python -m build, and a venv of Debian 12's Python that sees its BCC.
pytestmark = [pytest.mark.build, pytest.mark.kernel, pytest.mark.slow, pytest.mark.usefixtures('root')]


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp('dist'))


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory):
    """A venv with only the wheel and its dependencies (system packages visible, for BCC)."""
    venv = tmp_path_factory.mktemp('clean') / 'venv'
    subprocess.run([SYSTEM_PYTHON, '-m', 'venv', '--system-site-packages', str(venv)], check=True)
    subprocess.run(
        [str(venv / 'bin' / 'pip'), 'install', '-q', '--disable-pip-version-check', str(wheel),
         'datadog-checks-base[deps]'],
        check=True, capture_output=True,
    )  # fmt: skip
    return venv


def test_the_wheel_carries_the_bpf_objects_and_the_bcc_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ('oom_kill.bpf.o', 'ebpf_stats.bpf.o', 'oom_kill_bcc.c', 'oom_kill.h', 'oom_kill_fill.h'):
        assert f'datadog_checks/ebpf_probe/data/bpf/{name}' in names
    assert 'datadog_checks/ebpf_probe/data/conf.yaml.example' in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('entry_points.txt'))).decode()
    assert 'ebpf-probe = datadog_checks.ebpf_probe.cli:main' in entry_points


@pytest.mark.parametrize(
    'config, variant',
    [
        pytest.param('{}', 'co-re', id='co-re'),
        pytest.param('{enable_core: false}', 'bcc', id='bcc', marks=pytest.mark.bcc),
    ],
)
def test_the_installed_wheel_runs_the_check_without_the_source_tree(installed, tmp_path, config, variant):
    module = subprocess.run(
        [str(installed / 'bin' / 'python'), '-c', 'import datadog_checks.ebpf_probe as m; print(m.__file__)'],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    ).stdout.strip()  # fmt: skip
    assert module.startswith(str(installed)) and not module.startswith(str(REPO))
    conf = tmp_path / 'conf.yaml'
    conf.write_text(f'instances:\n  - {config}\n')
    result = subprocess.run(
        [str(installed / 'bin' / 'ebpf-probe'), 'check', '--json', '-l', 'info', '-c', str(conf)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'Loaded the oom_kill probe ({variant})' in result.stderr
    [run] = json.loads(result.stdout)
    assert {sc['status'] for sc in run['aggregator']['service_checks']} == {0}
    assert any(m['metric'] == 'ebpf_probe.programs.total' for m in run['aggregator']['metrics'])
