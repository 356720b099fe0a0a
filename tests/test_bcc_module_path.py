# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""`bcc_module_path`: BCC's Python module imported from a folder the running Python does not see.

The Agent's embedded Python sees only its own packages; Debian's python3-bpfcc puts BCC's module in
/usr/lib/python3/dist-packages/bcc. Only the `bcc` package is imported from there, never its
neighbours (they would shadow the Agent's own packages). tests/agent runs it with the real one.
"""

import importlib.util
import os
import sys

import pytest

from datadog_checks.base import AgentCheck
from datadog_checks.ebpf_probe import EbpfProbeCheck
from datadog_checks.ebpf_probe.kernel import bcc as kernel_bcc
from datadog_checks.ebpf_probe.kernel.bcc import BccError, import_bcc

CAN_LOAD = 'ebpf_probe.probe.can_load'

# A stand-in for BCC's module: a package whose submodules import each other both ways.
FAKE_BCC = {
    '__init__.py': 'from .libbcc import lib\nfrom bcc.table import Table\n',
    'libbcc.py': 'lib = "libbcc.so.0"\n',
    'table.py': 'from .libbcc import lib\nclass Table:\n    pass\n',
}


def make_package(folder, files):
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def no_bcc(monkeypatch):
    """No bcc module imported during the test; whatever was imported before is back afterwards."""
    for name in [n for n in sys.modules if n == 'bcc' or n.startswith('bcc.')]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [n for n in sys.modules if n == 'bcc' or n.startswith('bcc.')]:
        del sys.modules[name]


@pytest.fixture
def dist_packages(tmp_path):
    """A dist-packages folder with BCC's module and a neighbour that must stay invisible."""
    folder = tmp_path / 'dist-packages'
    make_package(folder / 'bcc', FAKE_BCC)
    make_package(folder / 'yaml', {'__init__.py': 'SHADOWED = True\n'})
    return folder


@pytest.mark.unit
@pytest.mark.parametrize('given', ['package', 'parent'])
def test_the_bcc_package_is_imported_from_the_folder_and_nothing_else(no_bcc, dist_packages, given):
    path_before = list(sys.path)
    module = import_bcc(str(dist_packages / 'bcc' if given == 'package' else dist_packages))
    assert module.__file__ == str(dist_packages / 'bcc' / '__init__.py')
    assert module.lib == 'libbcc.so.0' and module.Table.__module__ == 'bcc.table'
    assert sys.modules['bcc'] is module
    assert sys.path == path_before
    import yaml  # the Agent's own, not the neighbour

    assert not hasattr(yaml, 'SHADOWED')
    # Once imported, the same folder gives the same module.
    assert import_bcc(str(dist_packages / 'bcc')) is module


@pytest.mark.unit
def test_a_folder_without_bcc_says_what_to_install_and_what_to_set(no_bcc, tmp_path):
    with pytest.raises(BccError) as error:
        import_bcc(str(tmp_path))
    message = str(error.value)
    assert f'not in bcc_module_path {tmp_path}' in message
    assert 'python3-bpfcc' in message and '/usr/lib/python3/dist-packages/bcc' in message
    assert 'bcc' not in sys.modules


@pytest.mark.unit
def test_a_module_whose_library_is_missing_says_so_and_leaves_nothing_imported(no_bcc, tmp_path):
    broken = make_package(tmp_path / 'bcc', {**FAKE_BCC, 'libbcc.py': 'raise OSError("libbcc.so.0: cannot open")\n'})
    with pytest.raises(BccError) as error:
        import_bcc(str(broken))
    message = str(error.value)
    assert f"BCC's Python module in {broken} does not load with this Python" in message
    assert 'OSError: libbcc.so.0: cannot open' in message and 'python3-bpfcc' in message
    assert [n for n in sys.modules if n == 'bcc' or n.startswith('bcc.')] == []


@pytest.mark.unit
def test_another_folder_cannot_replace_a_bcc_already_imported(no_bcc, dist_packages, tmp_path):
    import_bcc(str(dist_packages))
    other = make_package(tmp_path / 'other' / 'bcc', FAKE_BCC)
    with pytest.raises(BccError, match='already imported from .* give every instance the same bcc_module_path'):
        import_bcc(str(other))


@pytest.mark.unit
def test_without_the_option_a_missing_bcc_names_the_option(monkeypatch):
    monkeypatch.setitem(sys.modules, 'bcc', None)  # import bcc raises ImportError
    with pytest.raises(BccError) as error:
        import_bcc()
    message = str(error.value)
    assert message.startswith("BCC's Python module is not importable")
    assert sys.executable in message
    assert 'set `bcc_module_path`' in message and '/usr/lib/python3/dist-packages/bcc' in message


@pytest.mark.kernel
def test_the_option_reaches_the_fallback(dd_run_check, aggregator, root, tmp_path):
    check = EbpfProbeCheck(
        'ebpf_probe',
        {},
        [{'enable_core': False, 'collect_ebpf_stats': False, 'bcc_module_path': str(tmp_path / 'nowhere')}],
    )
    dd_run_check(check)
    [sc] = aggregator.service_checks(CAN_LOAD)
    assert sc.status == AgentCheck.CRITICAL
    assert sc.message.startswith(
        f"runtime compilation with BCC failed: BCC's Python module is not in bcc_module_path {tmp_path / 'nowhere'}"
    )


@pytest.mark.kernel
def test_debians_bcc_through_the_option_loads_the_fallback(dd_run_check, aggregator, root, no_bcc, monkeypatch):
    """The host's python3-bpfcc, given by its path, to a Python that does not see it otherwise."""
    parent = os.path.dirname(kernel_bcc.DEBIAN_BCC_MODULE)
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if os.path.realpath(p) != os.path.realpath(parent)])
    assert importlib.util.find_spec('bcc') is None  # as in the Agent's embedded Python
    check = EbpfProbeCheck(
        'ebpf_probe',
        {},
        [{'enable_core': False, 'collect_ebpf_stats': False, 'bcc_module_path': kernel_bcc.DEBIAN_BCC_MODULE}],
    )
    try:
        dd_run_check(check)
        aggregator.assert_service_check(CAN_LOAD, AgentCheck.OK, tags=['probe:oom_kill'])
        assert sys.modules['bcc'].__file__ == os.path.join(kernel_bcc.DEBIAN_BCC_MODULE, '__init__.py')
    finally:
        check.cancel()
