# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel matrix: one test per row of tests/vm/kernels.py, each booting its kernel under qemu
and running this checkout's tests there with pytest, against the wheel built from the checkout.

`make test-kernels` runs every row, `make test-kernels KERNELS="5.10 6.12"` some; VM_PYTEST='...'
replaces the pytest arguments of every row. A row that cannot run fails with the reason.
"""

import os

import pytest

from . import kernels, run

pytestmark = pytest.mark.vm

ROWS = kernels.select(os.environ.get('KERNELS'))


@pytest.fixture(scope='session')
def wheel(tmp_path_factory):
    return run.build_wheel(tmp_path_factory.mktemp('dist'))


@pytest.mark.parametrize('row', ROWS, ids=[row.name for row in ROWS])
def test_kernel_row(row, wheel, vm_results):
    print(
        f'\n{row.name}: {row.kernel} ({row.arch}), layers {list(row.layers) or "none"}, '
        f'pytest {" ".join(run.selection(row))}',
        flush=True,
    )
    result = run.run_row(row, wheel, echo=lambda line: print(f'  {row.name} | {line}', flush=True))
    vm_results.append(result)
    print(result.line())
    print(result.facts_line(), flush=True)
    assert result.problem is None, f'row {row.name}: {result.problem}'
    assert result.release == row.release
    assert not result.failures, f'row {row.name}: {result.failed} failed, {result.errors} errors in the guest:\n' + (
        '\n'.join(result.failures)
    )
    assert not result.unexpected_passes, (
        f'row {row.name}: these expected failures pass now, take them out of tests/vm/kernels.py: '
        f'{result.unexpected_passes}'
    )
    expected_exit = 1 if result.expected_failed else 0
    assert result.pytest_exit == expected_exit, f'row {row.name}: pytest exit status {result.pytest_exit}'
    assert result.passed > 0, f'row {row.name}: no test passed (is the selection right?)'
