# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""One start-up measurement in a fresh process: python startup_child.py core|core-host-libbpf|bcc."""

import gc
import json
import logging
import sys
import time
from pathlib import Path

from datadog_checks.ebpf_probe.kernel import libbpf
from datadog_checks.ebpf_probe.oom_kill import OOMKillProbeOptions, load_oom_kill_probe
from tests.bpf_syscalls import libbpf_version


def status_kb(name):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(name + ':'):
                return int(line.split()[1])


def main():
    variant = sys.argv[1]
    if variant == 'core-host-libbpf':  # the host's libbpf.so.1, as if the bundled one were absent
        libbpf.BUNDLED_LIBBPF = Path('/nonexistent')
    options = OOMKillProbeOptions(
        enable_core=variant.startswith('core'), allow_runtime_compiled_fallback=variant == 'bcc'
    )
    log = logging.getLogger('bench')
    gc.collect()
    rss_before, hwm_before = status_kb('VmRSS'), status_kb('VmHWM')
    started = time.perf_counter()
    probe = load_oom_kill_probe(options, log)  # returns with the program attached
    elapsed_ms = (time.perf_counter() - started) * 1000
    time.sleep(0.3)  # let the background kallsyms read finish: steady state
    gc.collect()
    result = {
        'variant': probe.variant,
        'hooks': probe.hooks,
        'libbpf': libbpf_version() if variant != 'bcc' else None,
        'ms': elapsed_ms,
        'rss_before_kb': rss_before,
        'rss_after_kb': status_kb('VmRSS'),
        'hwm_before_kb': hwm_before,
        'hwm_after_kb': status_kb('VmHWM'),
    }
    probe.close()
    print(json.dumps(result))


if __name__ == '__main__':
    main()
