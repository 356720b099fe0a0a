# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The factory of the OOM-kill probe: the kernel and privileges checked first, then the CO-RE object
(core.py), then BCC's runtime compilation (bcc.py) if CO-RE fails and the options allow it."""

from __future__ import annotations

import errno
import os
import resource

from datadog_checks.ebpf_probe.kernel import requirements
from datadog_checks.ebpf_probe.kernel.requirements import RequirementError
from datadog_checks.ebpf_probe.lifecycle import ProbeLoadError

from .core import CORE_ERRORS, CoreOOMKillProbe
from .probe import Logger, OOMKillProbe, OOMKillProbeOptions, perf_buffer_pages, ring_buffer_size


def load_oom_kill_probe(options: OOMKillProbeOptions, log: Logger) -> OOMKillProbe:
    """Load the probe: CO-RE first, then BCC if allowed. Raises ProbeLoadError saying what is missing."""
    from .bcc import BCC_ERRORS, BccOOMKillProbe  # noqa: PLC0415 (the fallback's imports only when needed)

    if not options.enable_core and not options.allow_runtime_compiled_fallback:
        raise ProbeLoadError(
            'nothing to load: enable_core and allow_runtime_compiled_fallback are both false; enable one'
        )
    version = requirements.kernel_version()
    try:
        requirements.check_kernel_version(version)
        requirements.check_privileges(version)
        requirements.check_lockdown()
        buffer = max(  # a ring buffer, or a perf buffer per CPU where the kernel has none (before 5.8)
            ring_buffer_size(options.max_buffered_kills),
            perf_buffer_pages(options.max_buffered_kills) * resource.getpagesize() * (os.cpu_count() or 1),
        )
        requirements.raise_memlock_limit(buffer, version)
    except RequirementError as e:
        raise ProbeLoadError(str(e)) from None

    if not options.enable_core:
        try:
            return BccOOMKillProbe.load(options, log)
        except BCC_ERRORS as e:
            raise ProbeLoadError(f'runtime compilation with BCC failed: {e}') from None

    try:
        return CoreOOMKillProbe.load(options, log)
    except CORE_ERRORS as core_error:
        # Refused perf events: BCC attaches through them too, so say why rather than fall back.
        refused = getattr(core_error, 'errno', None) == errno.EACCES
        restriction = requirements.perf_event_restriction() if refused else ''
        if restriction:
            raise ProbeLoadError(f'CO-RE load failed: {core_error}; {restriction}') from None
        if not options.allow_runtime_compiled_fallback:
            raise ProbeLoadError(
                f'CO-RE load failed: {core_error}. Set allow_runtime_compiled_fallback: true to compile '
                'the probe at run time with BCC instead'
            ) from None
        log.warning(
            'CO-RE load of the OOM kill probe failed (%s); falling back to runtime compilation with BCC', core_error
        )
        try:
            probe = BccOOMKillProbe.load(options, log)
        except BCC_ERRORS as bcc_error:
            raise ProbeLoadError(
                f'CO-RE load failed: {core_error}; BCC runtime compilation failed too: {bcc_error}'
            ) from None
        probe.limitations = (f'it runs on the BCC fallback: CO-RE failed: {core_error}', *probe.limitations)
        return probe
