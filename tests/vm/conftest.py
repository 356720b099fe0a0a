# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
import pytest


@pytest.fixture(scope='session')
def vm_results(request):
    results = []
    request.config.stash[RESULTS] = results
    return results


RESULTS = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(RESULTS, None)
    if not results:
        return
    terminalreporter.section('kernel matrix')
    for result in results:
        terminalreporter.write_line(result.line())
    for result in results:
        terminalreporter.write_line(result.facts_line())
    for result in results:
        for line in result.expected_lines():
            terminalreporter.write_line(line)
    terminalreporter.write_line(f'(consoles, junit.xml, facts.json, dmesg.txt: {results[0].folder.parent})')
