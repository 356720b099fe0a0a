# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from datadog_checks.base import AgentCheck, ConfigurationError
from datadog_checks.base.utils.tagging import tagger

from . import containers
from .config_models import ConfigMixin, InstanceConfig, SharedConfig
from .containers import Container, parse_cgroup_path
from .ebpf_stats import EbpfStatsOptions, EbpfStatsProbe, MetricOptions, NamePatterns, StatsMetrics
from .ebpf_stats.metrics import COUNT
from .kernel import features
from .kernel.requirements import RequirementError
from .lifecycle import Probe, ProbeNotGranted, ProbeSlot
from .oom_kill import OOMKill, OOMKillProbe, OOMKillProbeOptions, load_oom_kill_probe, report
from .oom_kill.probe import DEFAULT_MEMORY_KILLERS
from .oom_kill.unaccounted import Reconciliation, UnaccountedKills
from .oom_kill.user_space import MEMORY_KILLER, SignalKills, killer_type

# What Datadog shows as the source of the check's events: the manifest's source_type_name.
SOURCE_TYPE_NAME = 'eBPF Probe'
# Options the Agent itself reads from any instance or init_config.
AGENT_OPTIONS = frozenset(
    {'name', 'loader', 'check_tag_cardinality', 'process_isolation', 'ha_enabled', 'profile_memory', 'service'}
)
# The tagger's cardinality for each of the Agent's names of it.
TAGGER_CARDINALITY = {containers.LOW: 'LOW', containers.ORCHESTRATOR: 'ORCHESTRATOR', containers.HIGH: 'HIGH'}

T = TypeVar('T')
P = TypeVar('P', bound=Probe)


def configured(value: T | None) -> T:
    """An option the spec gives a default: the config model never leaves it None."""
    if value is None:
        raise ConfigurationError('an option with a default came out empty from the config model')
    return value


def load_ebpf_stats_probe(options: EbpfStatsOptions, log: Any) -> EbpfStatsProbe:
    try:
        return EbpfStatsProbe.load(options, log)
    except RequirementError as e:  # eBPF stats are optional: an install that grants less chose so
        raise ProbeNotGranted(str(e)) from None


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
        self._cardinality = containers.LOW
        self._max_events = 0
        self._oom_kill: ProbeSlot[OOMKillProbe] | None = None
        self._ebpf_stats: ProbeSlot[EbpfStatsProbe] | None = None
        self._stats_metrics: StatsMetrics | None = None
        self._unaccounted_kills = UnaccountedKills(self._read_host_cache, self._write_host_cache)
        self._said_of_the_count: set[str] = set()
        self._signal_kills = SignalKills(())
        # Runs after the base class has validated the config models.
        self.check_initializations.append(self._configure)

    def _configure(self) -> None:
        """Validate everything first; only then set the check up (a bad option leaves nothing half-made)."""
        config = self.config
        options = OOMKillProbeOptions(
            enable_core=configured(config.enable_core),
            allow_runtime_compiled_fallback=configured(config.allow_runtime_compiled_fallback),
            mount_tracefs=configured(config.mount_tracefs),
            btf_path=config.btf_path,
            bcc_module_path=config.bcc_module_path,
            max_buffered_kills=configured(config.max_buffered_oom_kills),
            user_space_kills=configured(config.collect_user_space_kills),
            memory_killers=(
                tuple(config.memory_killers) if config.memory_killers is not None else DEFAULT_MEMORY_KILLERS
            ),
        )
        self._signal_kills = SignalKills(
            options.memory_killers,
            cgroup_v2=features.memory_cgroup_v2(),
            pressure=features.has_pressure_stall_info(),
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
        metric_options = MetricOptions(
            own_pid=os.getpid(),
            exclude_own_objects=configured(config.exclude_own_objects),
            programs=NamePatterns(patterns['program_name_include'], patterns['program_name_exclude']),
            maps=NamePatterns(patterns['map_name_include'], patterns['map_name_exclude']),
            max_programs=configured(config.max_programs_reported),
            max_maps=configured(config.max_maps_reported),
            run_time=configured(config.collect_program_runtime),
            cardinality=self._tag_cardinality(),
            container_tags=self._container_tags,
        )
        stats_options = EbpfStatsOptions(
            collect_program_runtime=configured(config.collect_program_runtime),
            runtime_sampling=float(configured(config.program_runtime_sampling)),
            interval=float(config.min_collection_interval or 15),
        )
        retry = float(configured(config.load_retry_max_interval))
        self._max_events = configured(config.max_oom_kill_events)
        self._cardinality = self._tag_cardinality()
        self._report_unknown_options()

        self._tags = list(config.tags or ())
        if config.collect_oom_kill:
            self._oom_kill = ProbeSlot(
                'oom_kill', 'collect_oom_kill', lambda: load_oom_kill_probe(options, self.log), retry, self
            )
        if config.collect_ebpf_stats:
            self._stats_metrics = StatsMetrics(metric_options)
            self._ebpf_stats = ProbeSlot(
                'ebpf_stats', 'collect_ebpf_stats', lambda: load_ebpf_stats_probe(stats_options, self.log), retry, self
            )

    # The account of kills is the host's, whatever the instance's options: AgentCheck's own persistent
    # cache is keyed by the check id, a hash of the config, so an edited config would start afresh
    # and lose the kills made meanwhile. One instance holds the OOM probe (probe.CLAIMS).
    def _read_host_cache(self, key: str) -> str:
        from datadog_checks.base import datadog_agent  # noqa: PLC0415 (the Agent's module, or its stub)

        return datadog_agent.read_persistent_cache(f'{self.__NAMESPACE__}_{key}')

    def _write_host_cache(self, key: str, value: str) -> None:
        from datadog_checks.base import datadog_agent  # noqa: PLC0415

        datadog_agent.write_persistent_cache(f'{self.__NAMESPACE__}_{key}', value)

    def _tag_cardinality(self) -> str:
        """The instance's check_tag_cardinality, else the Agent's checks_tag_cardinality, else low (as the Agent)."""
        from datadog_checks.base import datadog_agent  # noqa: PLC0415 (the Agent's module, or its stub)

        value = (self.instance or {}).get('check_tag_cardinality') or datadog_agent.get_config('checks_tag_cardinality')
        value = str(value or containers.LOW).lower()
        if value not in containers.CARDINALITIES:
            raise ConfigurationError(
                f'`check_tag_cardinality`: {value!r} is not one of {", ".join(containers.CARDINALITIES)}'
            )
        return value

    def _report_unknown_options(self) -> None:
        """Options this check does not know are said (once), never silently ignored."""
        for section, given_options, model in (
            ('instances', self.instance or {}, InstanceConfig),
            ('init_config', self.init_config or {}, SharedConfig),
        ):
            known = set(model.model_fields) | AGENT_OPTIONS
            unknown = sorted(str(option) for option in given_options if option not in known)
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
                self._collect_and_account_oom_kills(self._oom_kill)
            if self._ebpf_stats is not None:
                self._collect(self._ebpf_stats, self._collect_ebpf_stats)
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

    def _collect(self, slot: ProbeSlot[P], collect: Callable[[P], int]) -> int | None:
        """One probe's part of a run, with its own service check: a failure here leaves the other probe be.

        Returns what collect() returned, None when the probe did not run.
        """
        tags = [f'probe:{slot.name}', *self._tags]
        probe = slot.get()
        if probe is None:
            status = AgentCheck.WARNING if slot.not_granted else AgentCheck.CRITICAL
            self.service_check(self.SERVICE_CHECK_CAN_LOAD, status, tags=tags, message=slot.error or '')
            return None
        try:
            collected = collect(probe)
        except Exception as e:  # the kernel refused something this run (EPERM, ENOMEM...): say it, go on
            message = slot.run_failed(e)
            self.service_check(self.SERVICE_CHECK_CAN_LOAD, AgentCheck.CRITICAL, tags=tags, message=message)
            return None
        slot.run_succeeded()
        # Limitations are said once, as warnings; OK service checks carry no message.
        self.service_check(self.SERVICE_CHECK_CAN_LOAD, AgentCheck.OK, tags=tags)
        return collected

    def _collect_and_account_oom_kills(self, slot: ProbeSlot[OOMKillProbe]) -> None:
        """Report the kills, then compare with the kernel's count of them (taken first: see UnaccountedKills)."""
        self._unaccounted_kills.count()
        reported = self._collect(slot, self._collect_oom_kills)
        if slot.claim_refused:
            return  # the instance that holds the probe keeps the account
        reconciliation = self._unaccounted_kills.reconcile(reported or 0, probe_running=reported is not None)
        if reconciliation is not None:
            self.count('oom_kill.unaccounted', reconciliation.unaccounted, tags=self._tags)
            self._say_unaccounted(reconciliation, slot, reported is None)

    def _say_unaccounted(
        self, reconciliation: Reconciliation, slot: ProbeSlot[OOMKillProbe], not_running: bool
    ) -> None:
        """Once for each likely cause, the kills the kernel counted and the check did not report."""
        if reconciliation.unaccounted:
            if reconciliation.since_restart:
                cause = 'they happened while the check was not running (an Agent restart or upgrade, or a reboot)'
            elif not_running:
                cause = f'the OOM kill probe is not running: {slot.error}'
            else:
                hooks = ', '.join(slot.probe.hooks) if slot.probe is not None else 'none'
                cause = f'the hooks in use ({hooks}) did not see them'
            if cause not in self._said_of_the_count:
                self._said_of_the_count.add(cause)
                self.log.warning(
                    '%d OOM kills counted by the kernel (/proc/vmstat oom_kill) were not reported: %s '
                    '(ebpf_probe.oom_kill.unaccounted counts them)',
                    reconciliation.unaccounted,
                    cause,
                )
        if reconciliation.over_reported and 'over' not in self._said_of_the_count:
            self._said_of_the_count.add('over')
            self.log.warning(
                '%d OOM kills were reported that the kernel did not count as kills (/proc/vmstat oom_kill)',
                reconciliation.over_reported,
            )

    def _collect_oom_kills(self, probe: OOMKillProbe) -> int:
        """Submit the kills drained from the probe; how many the kernel counted of them, dropped ones included."""
        result = probe.get_and_flush()
        user_space = self._signal_kills.sort(result.signals, time.monotonic())
        grouped = report.group_members_together(result.kills) + [[kill] for kill in user_space.kills]
        grouped.sort(key=lambda kills: kills[0].timestamp)
        # An event each, up to max_oom_kill_events; the rest of a kill storm in one summary event.
        described, rest = grouped[: self._max_events], grouped[self._max_events :]
        for kills in described:
            self._submit_oom_kills(kills)
        for kills in rest:
            self._count_oom_kills(kills)
        if rest:
            last = max(kill.timestamp for kills in rest for kill in kills)
            title, text = report.storm_title(rest), report.storm_text(rest, len(described))
            self._oom_event(int(last), title, text, 'oom_kill_storm', ['oom_kill_storm:true'])
        for survived, sigterms in ((True, user_space.survived), (False, user_space.outcome_unknown)):
            for kill in sigterms:  # a memory killer's SIGTERM that killed nothing (as far as is known)
                container = parse_cgroup_path(kill.cgroup_path)
                tags = report.oom_kill_tags(kill, container, containers.HIGH) + report.killer_tags(kill, MEMORY_KILLER)
                tags += self._container_tags(container, containers.ORCHESTRATOR)
                self._oom_event(
                    int(kill.timestamp),
                    report.sigterm_title(kill, survived),
                    report.sigterm_text(kill, container, survived),
                    report.aggregation_key(kill, container),
                    tags,
                    alert_type='warning',
                )
        dropped = result.dropped + result.signals_dropped
        self.count('oom_kill.dropped', dropped + result.undecodable, tags=self._tags)
        if dropped:
            self.log.warning(
                '%d kills (%d by the kernel, %d signals from user space) were dropped in the kernel: raise '
                'max_buffered_oom_kills or run the check more often',
                dropped,
                result.dropped,
                result.signals_dropped,
            )
        if result.undecodable and 'undecodable' not in self._said_of_the_count:
            self._said_of_the_count.add('undecodable')
            self.log.warning(
                '%d OOM kill records could not be decoded (counted in ebpf_probe.oom_kill.dropped; said once): %s',
                result.undecodable,
                result.decode_error,
            )
        # The kernel kills, and counts, the chosen victim of a group kill again with its group.
        group_kills = sum(
            1
            for kills in grouped
            if kills[0].group_cgroup_path and kills[0].signal is None and any(k.chosen for k in kills)
        )
        return len(result.kills) + result.dropped + result.undecodable + group_kills

    def _collect_ebpf_stats(self, probe: EbpfStatsProbe) -> int:
        assert self._stats_metrics is not None
        instance_tags = tuple(self._tags)
        points = self._stats_metrics.points(probe.snapshot())
        for point in points:
            submit = self.count if point.type == COUNT else self.gauge
            submit(point.metric, point.value, tags=point.tags + instance_tags)
        return len(points)

    def _count_oom_kills(self, kills: list[OOMKill]) -> None:
        """A point per process killed: for memory (oom_kill.count), and, a container's main process,
        for stopping its container (container_kill.count). The metrics are counts users pay per series
        for: their tags follow the cardinality asked for."""
        for member in kills:
            member_container = parse_cgroup_path(member.cgroup_path)
            kind = killer_type(member, self._signal_kills.memory_killers)
            metric_tags = report.oom_kill_tags(member, member_container, self._cardinality)
            metric_tags += report.killer_tags(member, kind)
            metric_tags += self._container_tags(member_container, self._cardinality) + self._tags
            metric_tags = list(dict.fromkeys(metric_tags))
            if member.signal is None or kind == MEMORY_KILLER:
                self.count('oom_kill.count', 1, tags=metric_tags)
            if member.container_main_process:
                self.count('container_kill.count', 1, tags=metric_tags)

    def _submit_oom_kills(self, kills: list[OOMKill]) -> None:
        """A point per process killed, and one event for them: a kill, or the members of a group kill.
        The event is one document per occurrence: it carries everything known (pod and container)."""
        self._count_oom_kills(kills)
        kill = next((k for k in kills if k.chosen), kills[0])
        container = parse_cgroup_path(kill.cgroup_path)
        kind = killer_type(kill, self._signal_kills.memory_killers)
        event_tags = report.oom_kill_tags(kill, container, containers.HIGH) + report.killer_tags(kill, kind)
        event_tags += self._container_tags(container, containers.ORCHESTRATOR)
        if kill.signal is not None:
            title, text = report.signal_kill_title(kill, kind), report.signal_kill_text(kill, container, kind)
        elif len(kills) > 1:
            title, text = report.group_kill_title(kills), report.group_kill_text(kills, container)
        else:
            title, text = report.oom_kill_title(kill), report.oom_kill_text(kill, container)
        self._oom_event(int(kill.timestamp), title, text, report.aggregation_key(kill, container), event_tags)

    def _oom_event(
        self, timestamp: int, title: str, text: str, aggregation_key: str, tags: list[str], alert_type: str = 'error'
    ) -> None:
        self.event(
            {
                'timestamp': timestamp,
                'event_type': 'oom_kill',
                'msg_title': title,
                'msg_text': text,
                'alert_type': alert_type,
                'priority': 'normal',
                'source_type_name': SOURCE_TYPE_NAME,
                'aggregation_key': aggregation_key,
                'tags': list(dict.fromkeys(tags + self._tags)),
            }
        )

    @staticmethod
    def _container_tags(container: Container | None, cardinality: str) -> list[str]:
        """The Agent's tags for the container (image, pod, namespace...), when it knows it."""
        if container is None:
            return []
        level = getattr(tagger, TAGGER_CARDINALITY[cardinality])
        if container.id:
            tags = tagger.tag(f'container_id://{container.id}', level) or []
            if tags:
                return list(tags)
        if container.pod_uid:
            return list(tagger.tag(f'kubernetes_pod_uid://{container.pod_uid}', level) or [])
        return []
