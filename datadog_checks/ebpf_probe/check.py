# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
from __future__ import annotations

import os
import re
import threading
import time
from typing import Any, TypeVar

from datadog_checks.base import AgentCheck, ConfigurationError
from datadog_checks.base.utils.tagging import tagger

from . import formatting
from .accounting import COUNT, Accounting, AccountingOptions, NamePatterns
from .config_models import ConfigMixin, InstanceConfig, SharedConfig
from .containers import Container, parse_cgroup_path
from .ebpf_stats import EbpfStatsOptions, EbpfStatsProbe
from .kernel import RequirementError
from .oom_kill import FlushResult, OOMKill, OOMKillProbe, OOMKillProbeOptions, ProbeLoadError, load_oom_kill_probe

# Backoff between load attempts: 15 s, 30 s, 60 s, ... up to load_retry_max_interval.
FIRST_RETRY_INTERVAL = 15.0
# Options the Agent itself reads from any instance or init_config.
AGENT_OPTIONS = frozenset(
    {'name', 'loader', 'check_tag_cardinality', 'process_isolation', 'ha_enabled', 'profile_memory', 'service'}
)


T = TypeVar('T')


def given(value: T | None) -> T:
    """An option the spec gives a default: the config model never leaves it None."""
    if value is None:
        raise ConfigurationError('an option with a default came out empty from the config model')
    return value


class ProbeSlot:
    """One probe in the check: loaded on first use, retried with backoff when it cannot load.

    The error of a failed load is kept, reported on every run, and logged once per distinct
    message (no traceback): a host without the needed privileges is a state, not an accident.
    """

    def __init__(self, name: str, loader: Any, max_interval: float, check: AgentCheck):
        self.name = name
        self._loader = loader
        self._max_interval = max_interval
        self._check = check
        self.probe: Any = None
        self.error: str | None = None
        self._failures = 0
        self._next_attempt = 0.0
        self._logged_error: str | None = None

    def get(self) -> Any:
        """The loaded probe, loading it if due; None while it cannot load (see .error)."""
        if self.probe is not None:
            return self.probe
        now = time.monotonic()
        if now < self._next_attempt:
            return None
        try:
            self.probe = self._loader()
        except ProbeLoadError as e:
            self._failed(str(e), now)
            return None
        except Exception as e:  # an unexpected failure must not stop the other probe or later runs
            self._check.log.debug('Loading the %s probe failed', self.name, exc_info=True)
            self._failed(f'unexpected error: {type(e).__name__}: {e}', now)
            return None
        self._failures = 0
        self._next_attempt = 0.0
        self.error = None
        self._logged_error = None
        self._check.log.info(
            'Loaded the %s probe (%s) with %s', self.name, self.probe.variant, ', '.join(self.probe.hooks)
        )
        for hook, reason in self.probe.rejected_hooks.items():
            self._check.log.info('%s probe: not using %s: %s', self.name, hook, reason)
        for limitation in self.probe.limitations:
            self._check.warning('The %s probe runs with a limitation: %s', self.name, limitation)
        if self.probe.core_error:
            # The factory logged it; keep it visible in the check's status too.
            self._check.warnings.append(
                f'The {self.name} probe runs on the BCC fallback: CO-RE failed: {self.probe.core_error}'
            )
        return self.probe

    def _failed(self, message: str, now: float) -> None:
        self.error = message
        self._failures += 1
        interval = min(FIRST_RETRY_INTERVAL * 2 ** (self._failures - 1), self._max_interval)
        self._next_attempt = now + interval
        if message != self._logged_error:
            self._check.warning('Cannot load the %s probe: %s (retrying in %ds)', self.name, message, interval)
            self._logged_error = message
        else:
            self._check.log.debug('Still cannot load the %s probe: %s', self.name, message)

    def close(self) -> None:
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.close()


def load_ebpf_stats_probe(options: EbpfStatsOptions, log: Any) -> EbpfStatsProbe:
    try:
        return EbpfStatsProbe.load(options, log)
    except RequirementError as e:
        raise ProbeLoadError(str(e)) from None


class EbpfProbeCheck(AgentCheck, ConfigMixin):
    """What the kernel knows: OOM kills (a metric point and an event each) and every eBPF program and map."""

    __NAMESPACE__ = 'ebpf_probe'
    SERVICE_CHECK_CAN_LOAD = 'probe.can_load'

    def __init__(self, name: str, init_config: dict, instances: list[dict]):
        super().__init__(name, init_config, instances)
        self._lock = threading.Lock()
        self._running = False
        self._close_requested = False
        self._tags: list[str] = []
        self._oom_kill: ProbeSlot | None = None
        self._ebpf_stats: ProbeSlot | None = None
        self._accounting: Accounting | None = None
        # Runs after the base class has validated the config models.
        self.check_initializations.append(self._configure)

    def _configure(self) -> None:
        """Validate everything first; only then set the check up (a bad option leaves nothing half-made)."""
        config = self.config
        options = OOMKillProbeOptions(
            enable_core=given(config.enable_core),
            allow_runtime_compiled_fallback=given(config.allow_runtime_compiled_fallback),
            mount_tracefs=given(config.mount_tracefs),
            btf_path=config.btf_path,
            max_buffered_kills=given(config.max_buffered_oom_kills),
        )
        if not (options.enable_core or options.allow_runtime_compiled_fallback):
            raise ConfigurationError(
                '`enable_core` and `allow_runtime_compiled_fallback` are both false: the probe has no way to load'
            )
        patterns = {}
        for option in ('program_name_include', 'program_name_exclude', 'map_name_include', 'map_name_exclude'):
            try:
                patterns[option] = NamePatterns.compile(getattr(config, option), None).include
            except re.error as e:
                raise ConfigurationError(f'`{option}`: invalid regular expression: {e}') from None
        accounting = AccountingOptions(
            own_pid=os.getpid(),
            exclude_own_objects=given(config.exclude_own_objects),
            programs=NamePatterns(patterns['program_name_include'], patterns['program_name_exclude']),
            maps=NamePatterns(patterns['map_name_include'], patterns['map_name_exclude']),
            max_programs=given(config.max_programs_reported),
            max_maps=given(config.max_maps_reported),
            run_time=given(config.collect_program_runtime),
        )
        stats_options = EbpfStatsOptions(collect_program_runtime=given(config.collect_program_runtime))
        retry = float(given(config.load_retry_max_interval))
        self._report_unknown_options()

        self._tags = list(config.tags or ())
        if config.collect_oom_kill:
            self._oom_kill = ProbeSlot('oom_kill', lambda: load_oom_kill_probe(options, self.log), retry, self)
        if config.collect_ebpf_stats:
            self._accounting = Accounting(accounting)
            self._ebpf_stats = ProbeSlot(
                'ebpf_stats', lambda: load_ebpf_stats_probe(stats_options, self.log), retry, self
            )

    def _report_unknown_options(self) -> None:
        """Options this check does not know are said (once), never silently ignored."""
        for section, given, model in (
            ('instances', self.instance or {}, InstanceConfig),
            ('init_config', self.init_config or {}, SharedConfig),
        ):
            known = set(model.model_fields) | AGENT_OPTIONS
            unknown = sorted(str(option) for option in given if option not in known)
            if unknown:
                self.warning(
                    'Unknown option%s in `%s`, ignored: %s (see conf.yaml.example for the options)',
                    's' if len(unknown) > 1 else '',
                    section,
                    ', '.join(unknown),
                )

    def check(self, _: Any) -> None:
        with self._lock:
            self._running = True
        try:
            if self._oom_kill is not None:
                self._collect_oom_kills(self._oom_kill)
            if self._ebpf_stats is not None:
                self._collect_ebpf_stats(self._ebpf_stats)
        finally:
            with self._lock:
                self._running = False
                if self._close_requested:
                    self._close_requested = False
                    self._close_probes()

    def cancel(self) -> None:
        """Free the kernel-side probes; safe from any thread, and during a run (it then closes at its end)."""
        with self._lock:
            if self._running:
                self._close_requested = True
            else:
                self._close_probes()

    def _close_probes(self) -> None:
        for slot in (self._oom_kill, self._ebpf_stats):
            if slot is not None:
                slot.close()

    def _collect_oom_kills(self, slot: ProbeSlot) -> None:
        service_tags = ['probe:oom_kill', *self._tags]
        probe: OOMKillProbe | None = slot.get()
        if probe is None:
            self.service_check(
                self.SERVICE_CHECK_CAN_LOAD, AgentCheck.CRITICAL, tags=service_tags, message=slot.error or ''
            )
            return
        result: FlushResult = probe.get_and_flush()
        for kill in result.kills:
            self._submit_oom_kill(kill)
        self.count('oom_kill.dropped', result.dropped, tags=self._tags)
        if result.dropped:
            self.log.warning(
                '%d OOM kills were dropped in the kernel: raise max_buffered_oom_kills or run the check more often',
                result.dropped,
            )
        self.service_check(self.SERVICE_CHECK_CAN_LOAD, AgentCheck.OK, tags=service_tags)

    def _collect_ebpf_stats(self, slot: ProbeSlot) -> None:
        service_tags = ['probe:ebpf_stats', *self._tags]
        probe: EbpfStatsProbe | None = slot.get()
        if probe is None or self._accounting is None:
            self.service_check(
                self.SERVICE_CHECK_CAN_LOAD, AgentCheck.CRITICAL, tags=service_tags, message=slot.error or ''
            )
            return
        snapshot = probe.get_and_flush()
        for point in self._accounting.points(snapshot):
            submit = self.count if point.type == COUNT else self.gauge
            submit(point.metric, point.value, tags=[*point.tags, *self._tags])
        # Limitations were said once, when the probe loaded; OK service checks carry no message.
        self.service_check(self.SERVICE_CHECK_CAN_LOAD, AgentCheck.OK, tags=service_tags)

    def _submit_oom_kill(self, kill: OOMKill) -> None:
        container = parse_cgroup_path(kill.cgroup_path)
        tags = formatting.oom_kill_tags(kill, container) + self._container_tags(container) + self._tags
        self.count('oom_kill.count', 1, tags=tags)
        self.event(
            {
                'timestamp': int(kill.timestamp),
                'event_type': 'oom_kill',
                'msg_title': formatting.oom_kill_title(kill),
                'msg_text': formatting.oom_kill_text(kill, container),
                'alert_type': 'error',
                'priority': 'normal',
                'source_type_name': self.__NAMESPACE__,
                'aggregation_key': formatting.aggregation_key(kill, container),
                'tags': tags,
            }
        )

    @staticmethod
    def _container_tags(container: Container | None) -> list[str]:
        """The Agent's tags for the container (image, pod, namespace...), when it knows it."""
        if container is None:
            return []
        if container.id:
            tags = tagger.tag(f'container_id://{container.id}', tagger.ORCHESTRATOR) or []
            if tags:
                return list(tags)
        if container.pod_uid:
            return list(tagger.tag(f'kubernetes_pod_uid://{container.pod_uid}', tagger.ORCHESTRATOR) or [])
        return []
