# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""`ebpf-probe check`: run the check the way `datadog-agent check ebpf_probe` does and print what it submitted.

The Agent cannot be installed everywhere the check is developed; this runs the
same AgentCheck.run() against the aggregator stub from datadog_checks_base.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

EXAMPLE_CONFIG = Path(__file__).resolve().parent / 'data' / 'conf.yaml.example'
CHECK_NAME = 'ebpf_probe'
log = logging.getLogger('ebpf_probe.cli')
SERVICE_CHECK_STATUS = {0: 'OK', 1: 'WARNING', 2: 'CRITICAL', 3: 'UNKNOWN'}


class CliError(Exception):
    """A user error worth one line on stderr."""


def load_config(path: str | None) -> tuple[dict, list[dict]]:
    """(init_config, instances) from a conf.yaml, or from the packaged example's defaults."""
    source = Path(path) if path else EXAMPLE_CONFIG
    try:
        data = yaml.safe_load(source.read_text())
    except OSError as e:
        raise CliError(f'cannot read config file {source}: {e.strerror}') from None
    except yaml.YAMLError as e:
        raise CliError(f'config file {source} is not valid YAML: {str(e).splitlines()[0]}') from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CliError(f'config file {source} must be a mapping with `init_config` and `instances`')
    init_config = data.get('init_config') or {}
    instances = data.get('instances')
    if not isinstance(init_config, dict):
        raise CliError(f'config file {source}: `init_config` must be a mapping')
    if not isinstance(instances, list) or not instances:
        raise CliError(f'config file {source}: `instances` must be a non-empty list')
    result = []
    for i, instance in enumerate(instances, 1):
        instance = instance or {}  # an instance with every option commented out
        if not isinstance(instance, dict):
            raise CliError(f'config file {source}: instance {i} must be a mapping')
        result.append(instance)
    return init_config, result


def _collect(aggregator: Any, host: str, timestamp: int, interval: int) -> dict:
    metric_types = {v: k for k, v in aggregator.METRIC_ENUM_MAP.items()}
    metrics = []
    for name, stubs in aggregator._metrics.items():
        for stub in stubs:
            metrics.append(
                {
                    'metric': name,
                    'points': [[timestamp, stub.value]],
                    'tags': list(stub.tags),
                    'host': stub.hostname or host,
                    'type': metric_types.get(stub.type, str(stub.type)),
                    'interval': interval if metric_types.get(stub.type) in ('count', 'rate') else 0,
                    'source_type_name': 'System',
                }
            )
    events = []
    for event in aggregator.events:
        event = dict(event)
        event.setdefault('host', host)
        events.append(event)
    service_checks = []
    for name, stubs in aggregator._service_checks.items():
        for stub in stubs:
            service_checks.append(
                {
                    'check': name,
                    'host_name': stub.hostname or host,
                    'timestamp': timestamp,
                    'status': stub.status,
                    'message': stub.message or '',
                    'tags': list(stub.tags),
                }
            )
    return {'metrics': metrics, 'events': events, 'service_checks': service_checks}


def _print_run(out: TextIO, submitted: dict) -> None:
    out.write('=== Series ===\n')
    out.write(json.dumps(submitted['metrics'], indent=2, ensure_ascii=False) + '\n')
    out.write('=== Events ===\n')
    out.write(json.dumps(submitted['events'], indent=2, ensure_ascii=False) + '\n')
    out.write('=== Service Checks ===\n')
    out.write(json.dumps(submitted['service_checks'], indent=2, ensure_ascii=False) + '\n')


def _print_summary(out: TextIO, version: str, runs: list[dict]) -> None:
    instances = sorted({run['runner']['instance'] for run in runs})
    out.write('\n=========\nCollector\n=========\n\n  Running Checks\n  ==============\n\n')
    title = f'{CHECK_NAME} ({version})'
    out.write(f'    {title}\n    {"-" * len(title)}\n')
    for instance in instances:
        mine = [run for run in runs if run['runner']['instance'] == instance]
        last = mine[-1]
        status = 'ERROR' if last['runner']['last_error'] else 'OK'
        agg = [run['aggregator'] for run in mine]
        out.write(f'      Instance: {instance} [{status}]\n')
        out.write(f'      Total Runs: {len(mine)}\n')
        for label, key in (('Metric Samples', 'metrics'), ('Events', 'events'), ('Service Checks', 'service_checks')):
            out.write(f'      {label}: Last Run: {len(agg[-1][key])}, Total: {sum(len(a[key]) for a in agg)}\n')
        average = sum(run['runner']['execution_time_ms'] for run in mine) / len(mine)
        out.write(f'      Average Execution Time : {average:.0f}ms\n')
        out.write(f'      Last Execution Date : {last["runner"]["last_execution_date"]}\n')
        for warning in last['runner']['warnings']:
            out.write(f'      Warning: {warning}\n')
        if last['runner']['last_error']:
            out.write(f'      Error: {last["runner"]["last_error"]}\n')
        out.write('\n')


def use_cache_file(path: str) -> None:
    """Keep the Agent's persistent cache (what a check remembers across restarts) in a JSON file."""
    from datadog_checks.base.stubs import datadog_agent  # noqa: PLC0415

    cache = Path(path)

    def read(key: str) -> str:
        try:
            return json.loads(cache.read_text()).get(key, '')
        except (OSError, ValueError):
            return ''

    def write(key: str, value: str) -> None:
        try:
            data = json.loads(cache.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = value
        temporary = cache.with_name(cache.name + '.tmp')
        temporary.write_text(json.dumps(data))
        temporary.replace(cache)

    datadog_agent.read_persistent_cache = read  # type: ignore[method-assign]
    datadog_agent.write_persistent_cache = write  # type: ignore[method-assign]


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# Set by SIGUSR1: the pause in progress (or the next one) ends at once, so that a script can have
# the next run made right after something it caused (`kill -USR1`), however long that took.
_next_run_now = threading.Event()


def _end_pause(_signum: int, _frame: FrameType | None) -> None:
    _next_run_now.set()


def run_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    init_config, instances = load_config(args.config)

    # Imported here so that `--help` and config errors stay fast.
    from datadog_checks.base.stubs import aggregator

    from . import __version__
    from .check import EbpfProbeCheck

    if args.cache_file:
        use_cache_file(args.cache_file)
    host = socket.gethostname()
    interval = int(instances[0].get('min_collection_interval', 15) or 15)
    checks = [EbpfProbeCheck(CHECK_NAME, init_config, [instance]) for instance in instances]
    runs: list[dict] = []
    problems: list[str] = []  # a run that failed, or a probe CRITICAL: exit status 1
    notices: list[str] = []  # a probe WARNING (a feature the install does not grant): said, exit status 0
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGUSR1, _end_pause)
    try:
        for n in range(args.check_times):
            if n:
                _next_run_now.wait(args.pause / 1000)
                _next_run_now.clear()
            for index, check in enumerate(checks):
                aggregator.reset()
                started = time.monotonic()
                error_report = check.run()
                elapsed_ms = (time.monotonic() - started) * 1000
                submitted = _collect(aggregator, host, int(time.time()), interval)
                last_error = ''
                if error_report:
                    last_error = json.loads(error_report)[0]['message']
                    problems.append(last_error)
                for sc in submitted['service_checks']:
                    probe = ','.join(t for t in sc['tags'] if t.startswith('probe:'))
                    if sc['status'] == 2:
                        problems.append(f'{sc["check"]} ({probe}) is CRITICAL: {sc["message"]}')
                    elif sc['status'] == 1:
                        notices.append(f'{sc["check"]} ({probe}) is WARNING: {sc["message"]}')
                runs.append(
                    {
                        'aggregator': submitted,
                        'runner': {
                            'check': CHECK_NAME,
                            'instance': index,
                            'run': n + 1,
                            'execution_time_ms': round(elapsed_ms, 3),
                            'last_execution_date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
                            'last_error': last_error,
                            'warnings': list(check.warnings),
                        },
                    }
                )
                check.warnings.clear()
                log.info('run %d of %d finished (instance %d)', n + 1, args.check_times, index)
                if not args.json:
                    _print_run(out, submitted)
                    out.flush()
    finally:
        for check in checks:
            check.cancel()
    if args.json:
        out.write(json.dumps(runs, indent=2, ensure_ascii=False) + '\n')
    else:
        _print_summary(out, __version__, runs)
    for problem in dict.fromkeys(problems):  # each distinct problem once, in order
        err.write(f'ebpf-probe: error: {" ".join(problem.split())}\n')
    for notice in dict.fromkeys(notices):
        err.write(f'ebpf-probe: warning: {" ".join(notice.split())}\n')
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ebpf-probe', description='Run the ebpf_probe Datadog check.')
    commands = parser.add_subparsers(dest='command', required=True)
    check = commands.add_parser(
        'check', help='run the check once (or -t N times) and print what it submitted, like `datadog-agent check`'
    )
    check.add_argument('-c', '--config', help='conf.yaml with init_config and instances (default: the example)')
    check.add_argument('-t', '--check-times', type=int, default=1, help='number of runs (default 1)')
    check.add_argument(
        '--pause', type=int, default=0, metavar='MS', help='milliseconds between runs (SIGUSR1 ends a pause at once)'
    )
    check.add_argument('--json', action='store_true', help='print a JSON list with one entry per run')
    check.add_argument(
        '--cache-file',
        metavar='PATH',
        help="keep the Agent's persistent cache in this file, as the Agent keeps it across restarts "
        '(default: in memory, for this run only)',
    )
    check.add_argument(
        '-l',
        '--log-level',
        default='error',
        choices=['debug', 'info', 'warning', 'error'],
        help='log level on stderr (default error: warnings are in the summary)',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_times < 1 or args.pause < 0:
        print('ebpf-probe: error: --check-times must be >= 1 and --pause >= 0', file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format='%(levelname)s %(name)s: %(message)s')
    try:
        return run_check(args, sys.stdout, sys.stderr)
    except CliError as e:
        print(f'ebpf-probe: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
