# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The check as the Agent runs it, in a Debian 13 root standing for the Agent (make agent-root).

Python 3.13 (the Agent's), a venv without system site-packages holding only datadog-checks-base and
this checkout's wheel, installed as `agent integration install` installs it, and no libbpf1, no BCC,
no clang, no kernel headers. The root is entered with chroot on this machine's kernel; OOM victims
are started from outside, as any process on the host would be. Each test runs the README's steps
it is named after (the README's blocks are read here, so that they cannot drift from what ran).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from tests.package import build_wheel
from tests.processes import UNTIL_TOLD, next_run_now, read_until

from .root import (
    BASE,
    CONF,
    CONFD,
    DD_AGENT,
    EBPF_PROBE,
    EMBEDDED,
    PYTHON,
    REPO,
    SITE_PACKAGES,
    TOOLS,
    Root,
    integration_install,
    readme_blocks,
)

pytestmark = [pytest.mark.agent, pytest.mark.kernel, pytest.mark.slow, pytest.mark.usefixtures('root')]

# What Docker and containerd give a container without asking (moby's oci/caps/defaults.go,
# containerd's oci/spec.go); the README's Helm, Operator and docker values add theirs to these.
RUNTIME_DEFAULT_CAPABILITIES = ('CHOWN', 'DAC_OVERRIDE', 'FSETID', 'FOWNER', 'MKNOD', 'NET_RAW', 'SETGID',
                                'SETUID', 'SETFCAP', 'SETPCAP', 'NET_BIND_SERVICE', 'SYS_CHROOT', 'KILL',
                                'AUDIT_WRITE')  # fmt: skip
CAPABILITY_BITS = {'SYS_ADMIN': 21, 'PERFMON': 38, 'BPF': 39}
DEBIAN_BCC_MODULE = '/usr/lib/python3/dist-packages/bcc'
KERNEL_HEADERS = REPO / '.cache' / 'kernel-headers'  # make kernel-headers: Debian's, for BCC (a test fixture)
NOT_IN_THE_ROOT = re.compile(r'^(libbpf|libbcc|bpfcc|python3-bpfcc|bpftool|clang|llvm|libclang|linux-headers)')


# --- The README's deployment blocks ----------------------------------------------------------------


def readme_dockerfile(wheel: Path) -> list[str]:
    return ['FROM gcr.io/datadoghq/agent:7', f'COPY {wheel.name} /tmp/',
            f'RUN agent integration install --allow-root --local-wheel /tmp/{wheel.name}']  # fmt: skip


def readme_systemd_capabilities() -> list[str]:
    """The capabilities of the README's drop-in for the Agent's systemd unit."""
    [dropin] = [b for b in readme_blocks('ini') if b.startswith('[Service]')]
    [line] = [line for line in dropin.splitlines() if line.startswith('AmbientCapabilities=')]
    return line.split('=', 1)[1].split()


def readme_container_capabilities() -> set[str]:
    """The capabilities the README's Helm, Operator and docker values add to the Agent's container."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if 'capabilities' in node and isinstance(node['capabilities'], dict):
                found.append(frozenset(node['capabilities']['add']))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for block in readme_blocks('yaml'):
        walk(yaml.safe_load(block))
    for block in readme_blocks('sh'):
        if block.startswith('docker run'):
            found.append(frozenset(re.findall(r'--cap-add (\w+)', block)))
    assert len(found) == 3, 'the Helm, Operator and docker examples each add capabilities'
    assert len(set(found)) == 1, f'the examples differ: {found}'
    return set(found[0])


# --- Roots -----------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp('dist'))


@pytest.fixture(scope='module')
def image(wheel, tmp_path_factory) -> Root:
    """The README's Dockerfile, in the root: the wheel copied to /tmp and installed as root
    (`--allow-root`), then the README's step that enables the check."""
    root = Root(tmp_path_factory.mktemp('image'))
    integration_install(root, wheel)
    root.shell(f'cp {CONFD}/conf.yaml.example {CONF}')
    return root


@pytest.fixture(scope='module')
def host(wheel, tmp_path_factory) -> Root:
    """The README's host steps: the wheel installed and the check enabled as dd-agent."""
    root = Root(tmp_path_factory.mktemp('host'))
    integration_install(root, wheel, user=DD_AGENT)
    root.run(root.as_user(['cp', f'{CONFD}/conf.yaml.example', CONF]))
    return root


@pytest.fixture(scope='module')
def image_with_bcc(wheel, tmp_path_factory) -> Root:
    """The image with Debian's BCC installed by apt-get (the tools layer: python3-bpfcc)."""
    root = Root(tmp_path_factory.mktemp('image-bcc'), layers=(BASE, TOOLS))
    integration_install(root, wheel)
    return root


def configure(root: Root, name: str, config: str) -> str:
    """A config file of a test's own (the README's conf.yaml stays as its steps made it)."""
    path = f'/tmp/{name}.yaml'
    root.put(path, config)
    return path


def check_with_an_oom_kill(
    root: Root,
    memory_cgroup,
    command: Sequence[str] = (),
    comm: str = 'agent-victim',
    conf: str = CONF,
    **kwargs,
) -> tuple[list[dict], str, int, int]:
    """`ebpf-probe check --json` twice in the root, a process OOM-killed between the two runs:
    (runs, stderr, exit status, the victim's pid)."""
    argv = [*command, EBPF_PROBE, 'check', '--json', '-t', '2', '--pause', UNTIL_TOLD, '-l', 'info', '-c', conf]
    proc = root.popen(argv, **kwargs)
    try:
        first = read_until(proc.stderr, 'run 1 of 2 finished')
        victim = memory_cgroup.oom_kill(comm=comm, oom_score_adj=42)
        next_run_now(proc)
        stdout, rest = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert stdout, first + rest
    return json.loads(stdout), first + rest, proc.returncode, victim.pid


def assert_the_victim_is_reported(runs: list[dict], memory_cgroup, pid: int, comm: str = 'agent-victim') -> None:
    second = runs[1]['aggregator']
    events = [e for e in second['events'] if e['msg_title'] == f'OOM kill: {comm} (pid {pid})']
    assert len(events) == 1, second['events']
    [event] = events
    assert f'(pid {pid}, uid 0, oom_score_adj 42)' in event['msg_text']
    # A memory cgroup OOM, told as such with any of these capability sets: by the kprobe, or by the
    # cgroup left without room where the kernel has no kprobes (kallsyms' addresses not needed).
    expected = {f'process_name:{comm}', f'cgroup_name:{memory_cgroup.name}', 'trigger_type:cgroup'}
    assert expected <= set(event['tags']), event['tags']
    points = [m for m in second['metrics'] if m['metric'] == 'ebpf_probe.oom_kill.count'
              and f'cgroup_name:{memory_cgroup.name}' in m['tags']]  # fmt: skip
    assert [p['points'][0][1] for p in points] == [1]


def statuses(run: dict) -> dict[str, tuple[int, str]]:
    return {sc['tags'][0]: (sc['status'], sc['message']) for sc in run['aggregator']['service_checks']}


def capabilities(root: Root, command: Sequence[str]) -> dict[str, str]:
    """The uid and capability sets of the root's Python, started the way `command` starts it."""
    status = root.run([*command, PYTHON, '-c', 'print(open("/proc/self/status").read())']).stdout
    return dict(re.findall(r'^(Uid|Cap\w+):\s+(.*)$', status, re.M))


def capability_mask(names) -> str:
    return f'{sum(1 << CAPABILITY_BITS[name.removeprefix("CAP_")] for name in names):016x}'


# --- The root is what the Agent offers, and nothing more ---------------------------------------------


def test_the_root_has_python_3_13_and_no_libbpf_bcc_clang_or_headers(image):
    assert image.shell(f'{PYTHON} -c "import sys; print(*sys.version_info[:2])"').split() == ['3', '13']
    assert image.shell('cut -d. -f1 /etc/debian_version').strip() == '13'
    packages = image.run(['dpkg-query', '-W', '-f=${Package}\\n']).stdout.split()
    assert [p for p in packages if NOT_IN_THE_ROOT.match(p)] == []
    assert 'libbpf' not in image.shell('ldconfig -p') and image.shell('ls /usr/src; ls /lib/modules || true') == ''
    assert image.run(['sh', '-c', 'command -v clang bpftool'], check=False).stdout == ''
    assert 'include-system-site-packages = false' in image.shell(f'cat {EMBEDDED}/pyvenv.cfg')
    assert "No module named 'bcc'" in image.run([PYTHON, '-c', 'import bcc'], check=False).stderr


INSTALLED_BEYOND_THE_BASE = """
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as name
closure, todo = set(), [('datadog-checks-base', 'deps')]
while todo:
    package, extra = todo.pop()
    if name(package) in closure:
        continue
    closure.add(name(package))
    for line in md.requires(package) or ():
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({'extra': extra}):
            todo.append((req.name, ''))
print(*sorted({name(d.metadata['Name']) for d in md.distributions()} - closure))
"""


def test_the_agents_python_holds_datadog_checks_base_and_the_wheel_and_nothing_else(image):
    assert image.run([PYTHON, '-c', INSTALLED_BEYOND_THE_BASE]).stdout.split() == ['datadog-ebpf-probe', 'pip']


def test_the_readmes_dockerfile_is_the_install_that_ran(wheel, image):
    blocks = [b.splitlines() for b in readme_blocks('Dockerfile')]
    assert readme_dockerfile(wheel) in blocks
    # integration install copied the example config; the README's step made conf.yaml of it.
    listed = image.shell(f'ls {CONFD}').split()
    assert listed == ['conf.yaml', 'conf.yaml.example']


def test_the_readmes_host_steps_are_the_install_that_ran(wheel, host):
    commands = {line for block in readme_blocks('sh') for line in block.splitlines()}
    assert f'sudo -u {DD_AGENT} datadog-agent integration install --local-wheel {wheel.name}' in commands
    assert f'sudo -u {DD_AGENT} cp {CONFD}/conf.yaml.example {CONF}' in commands
    listed = host.shell(f'stat -c "%U %n" {CONFD}/*').splitlines()
    assert listed == [f'{DD_AGENT} {CONF}', f'{DD_AGENT} {CONFD}/conf.yaml.example']


# --- As root, in the Agent's container -------------------------------------------------------------


def test_as_root_in_the_agents_container_co_re_loads_the_bundled_libbpf_and_reports_a_real_oom_kill(
    image, memory_cgroup
):
    added = readme_container_capabilities()
    assert added == {'BPF', 'PERFMON', 'SYS_ADMIN'}
    bounding = ','.join(['-all', *(f'+{c.lower()}' for c in (*RUNTIME_DEFAULT_CAPABILITIES, *sorted(added)))])
    container = ['setpriv', '--inh-caps=-all', f'--bounding-set={bounding}']
    seen = capabilities(image, container)
    assert seen['Uid'].split()[0] == '0'
    assert int(seen['CapEff'], 16) & int(capability_mask(added), 16) == int(capability_mask(added), 16)
    assert int(seen['CapEff'], 16).bit_count() == len(RUNTIME_DEFAULT_CAPABILITIES) + len(added)

    runs, stderr, status, pid = check_with_an_oom_kill(image, memory_cgroup, container)
    assert status == 0, stderr
    bundled = f'{SITE_PACKAGES}/datadog_checks/ebpf_probe/data/lib/libbpf.so.1'
    assert f'libbpf 1.5 loaded from {bundled}' in stderr
    assert 'Loaded the oom_kill probe (co-re)' in stderr and 'Loaded the ebpf_stats probe (co-re)' in stderr
    assert_the_victim_is_reported(runs, memory_cgroup, pid)
    assert statuses(runs[1]) == {'probe:oom_kill': (0, ''), 'probe:ebpf_stats': (0, '')}
    assert any(m['metric'] == 'ebpf_probe.programs.total' for m in runs[1]['aggregator']['metrics'])


# --- As dd-agent, with the capabilities of the systemd unit --------------------------------------------


def test_as_dd_agent_with_cap_bpf_and_cap_perfmon_oom_kills_work_and_accounting_says_once_it_needs_cap_sys_admin(
    host, memory_cgroup
):
    oom_only = ['CAP_BPF', 'CAP_PERFMON']
    command = host.as_user([], oom_only)
    seen = capabilities(host, command)
    assert seen['Uid'].split() == ['100'] * 4
    assert seen['CapEff'] == seen['CapAmb'] == capability_mask(oom_only)

    runs, stderr, status, pid = check_with_an_oom_kill(host, memory_cgroup, command, env={'HOME': '/opt/datadog-agent'})
    assert 'Loaded the oom_kill probe (co-re)' in stderr
    assert_the_victim_is_reported(runs, memory_cgroup, pid)
    for run in runs:
        oom, stats = statuses(run)['probe:oom_kill'], statuses(run)['probe:ebpf_stats']
        assert oom == (0, '')
        # A WARNING, not a CRITICAL: OOM kills alone is what this install granted.
        assert stats[0] == 1 and stats[1].startswith('missing capability CAP_SYS_ADMIN: ')
    # Said once: one warning in the log, one line on stderr; no error, so the exit status is 0.
    assert stderr.count('Cannot load the ebpf_stats probe: missing capability CAP_SYS_ADMIN') == 1, stderr
    assert [line for line in stderr.splitlines() if line.startswith('ebpf-probe: ')] == [
        'ebpf-probe: warning: ebpf_probe.probe.can_load (probe:ebpf_stats) is WARNING: ' + stats[1]
    ]
    assert status == 0


def test_as_dd_agent_with_the_readmes_systemd_capabilities_both_features_work(host, memory_cgroup):
    granted = readme_systemd_capabilities()
    assert granted == ['CAP_BPF', 'CAP_PERFMON', 'CAP_SYS_ADMIN']
    command = host.as_user([], granted)
    seen = capabilities(host, command)
    assert seen['Uid'].split()[0] == '100' and seen['CapEff'] == capability_mask(granted)

    runs, stderr, status, pid = check_with_an_oom_kill(host, memory_cgroup, command, env={'HOME': '/opt/datadog-agent'})
    assert status == 0, stderr
    assert_the_victim_is_reported(runs, memory_cgroup, pid)
    assert statuses(runs[1]) == {'probe:oom_kill': (0, ''), 'probe:ebpf_stats': (0, '')}
    owners = {t for m in runs[1]['aggregator']['metrics'] if m['metric'] == 'ebpf_probe.programs.total'
              for t in m['tags'] if t.startswith('owner:')}  # fmt: skip
    assert 'owner:ebpf-probe' in owners


def test_with_cap_syslog_too_and_oom_kills_only_dd_agent_reports_the_kill_without_a_critical(host, memory_cgroup):
    """The README's OOM-kills-only set, with the optional CAP_SYSLOG (kallsyms' addresses, which tell
    a system OOM as such on kernels without kprobes)."""
    granted = ['CAP_BPF', 'CAP_PERFMON', 'CAP_SYSLOG']
    conf = configure(host, 'oom-only', 'init_config:\ninstances:\n  - collect_ebpf_stats: false\n')
    runs, stderr, status, pid = check_with_an_oom_kill(
        host, memory_cgroup, host.as_user([], granted), conf=conf, env={'HOME': '/opt/datadog-agent'}
    )
    assert status == 0, stderr
    assert statuses(runs[1]) == {'probe:oom_kill': (0, '')}
    assert_the_victim_is_reported(runs, memory_cgroup, pid)


# --- The BCC fallback ----------------------------------------------------------------------------------

BCC_ONLY = 'init_config:\ninstances:\n  - enable_core: false\n    collect_ebpf_stats: false\n'


def test_without_bcc_the_fallback_is_critical_and_says_what_to_install_and_which_option_to_set(image):
    conf = configure(image, 'bcc-only', BCC_ONLY)
    result = image.run([EBPF_PROBE, 'check', '--json', '-c', conf], check=False)
    assert result.returncode == 1
    [run] = json.loads(result.stdout)
    status, message = statuses(run)['probe:oom_kill']
    assert status == 2
    assert message.startswith("runtime compilation with BCC failed: BCC's Python module is not importable")
    for hint in ('python3-bpfcc', '`bcc_module_path`', DEBIAN_BCC_MODULE, f'({EMBEDDED}/bin/python3'):
        assert hint in message, message
    [line] = result.stderr.splitlines()
    assert line.startswith('ebpf-probe: error:') and 'bcc_module_path' in line


@pytest.mark.oom
def test_debians_python3_bpfcc_given_by_bcc_module_path_runs_the_fallback(image_with_bcc, memory_cgroup):
    root = image_with_bcc
    # The system's Python sees Debian's BCC; the Agent's does not, and needs the option.
    assert root.run(['python3', '-c', 'import bcc; print(bcc.__file__)']).stdout.startswith(DEBIAN_BCC_MODULE)
    assert root.run([PYTHON, '-c', 'import bcc'], check=False).returncode != 0
    assert KERNEL_HEADERS.is_dir(), f'{KERNEL_HEADERS} is missing: `make kernel-headers` makes it'
    conf = configure(root, 'bcc-by-path', BCC_ONLY + f'    bcc_module_path: {DEBIAN_BCC_MODULE}\n')
    # This machine's kernel has no headers of its own: Debian's, given as the host suite gives them.
    headers = {'binds': ['/usr/src:/usr/src:ro', f'{KERNEL_HEADERS}:/kernel-headers:ro'],
               'env': {'BCC_KERNEL_SOURCE': '/kernel-headers'}}  # fmt: skip
    runs, stderr, status, pid = check_with_an_oom_kill(root, memory_cgroup, conf=conf, **headers)
    assert status == 0, stderr
    assert 'Loaded the oom_kill probe (bcc)' in stderr
    assert_the_victim_is_reported(runs, memory_cgroup, pid)  # root, every capability
