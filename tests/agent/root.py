# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The tests' Agent-like runtime: a Debian 13 root (build_root.sh) entered with in_root.sh.

The root's /opt/datadog-agent/embedded stands for the Agent's embedded Python, and the wheel goes
into it the way `agent integration install --local-wheel` puts it there. Each Root writes to a
scratch folder of its own: the cached layers stay as built.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import textwrap
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
CACHE = REPO / '.cache' / 'trixie'
BASE, TOOLS = CACHE / 'base', CACHE / 'tools'
IN_ROOT = Path(__file__).with_name('in_root.sh')
README = REPO / 'README.md'

EMBEDDED = '/opt/datadog-agent/embedded'
PYTHON = f'{EMBEDDED}/bin/python3'
EBPF_PROBE = f'{EMBEDDED}/bin/ebpf-probe'
SITE_PACKAGES = f'{EMBEDDED}/lib/python3.13/site-packages'
CONFD = '/etc/datadog-agent/conf.d/ebpf_probe.d'
CONF = f'{CONFD}/conf.yaml'
DD_AGENT = 'dd-agent'


class Root:
    """The Debian 13 root made of `layers` (lowest first), writing to `scratch`."""

    def __init__(self, scratch: Path, layers: Sequence[Path] = (BASE,)):
        for layer in layers:
            assert layer.is_dir(), f'{layer} is missing: `make agent-root` builds it'
        self.layers = tuple(layers)
        self.upper = scratch / 'upper'
        self.upper.mkdir(parents=True, exist_ok=True)

    def argv(
        self, command: Sequence[str], env: Mapping[str, str] | None = None, binds: Iterable[str] = ()
    ) -> list[str]:
        args = [str(IN_ROOT)]
        for layer in self.layers:
            args += ['-l', str(layer)]
        args += ['-u', str(self.upper)]
        for bind in binds:
            args += ['-b', bind]
        for name, value in (env or {}).items():
            args += ['-e', f'{name}={value}']
        return [*args, '--', *command]

    def run(
        self, command: Sequence[str], check: bool = True, timeout: float = 120, **kwargs
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(command, **kwargs), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f'{shlex.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}')
        return result

    def popen(self, command: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(command, **kwargs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def shell(self, script: str, **kwargs) -> str:
        return self.run(['sh', '-euc', script], **kwargs).stdout

    def put(self, inside: str, content: bytes | str, mode: int = 0o644) -> None:
        """Write a file at `inside` in the root (into the scratch folder, between two runs)."""
        path = self.upper / inside.lstrip('/')
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)

    def user_ids(self, name: str = DD_AGENT) -> tuple[int, int]:
        uid, gid = self.shell(f'id -u {name}; id -g {name}').split()
        return int(uid), int(gid)

    def as_user(self, command: Sequence[str], capabilities: Sequence[str] = (), name: str = DD_AGENT) -> list[str]:
        """command as the user `name`, with `capabilities` ambient: what systemd does for a unit's
        User= and AmbientCapabilities= (this machine has no systemd to do it)."""
        uid, gid = self.user_ids(name)
        caps = ','.join(f'+{c.lower().removeprefix("cap_")}' for c in capabilities) or '-all'
        return ['setpriv', f'--reuid={uid}', f'--regid={gid}', '--clear-groups', f'--inh-caps={caps}',
                f'--ambient-caps={caps}', *command]  # fmt: skip


def integration_install(root: Root, wheel: Path, user: str | None = None) -> str:
    """What `agent integration install --local-wheel WHEEL` does (the Agent's Go code in
    cmd/agent/subcommands/integrations/command.go), with the root's Python for the Agent's:

    - the wheel must require datadog-checks-base (validateBaseDependency);
    - `python -mpip install --no-cache-dir --no-index --no-deps WHEEL --disable-pip-version-check`
      (the Agent adds `--constraint` with its own constraints file, which only this Agent has);
    - the `*.yaml*` files of the package's data/ folder copied to conf.d/<check>.d/.

    As root (`--allow-root`, the Dockerfile) or as `user` (`sudo -u dd-agent` on a host). The wheel is
    copied to /tmp first (the Dockerfile's COPY). Returns pip's output.
    """
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith('.dist-info/METADATA'))
    )
    assert re.search(rb'^Requires-Dist: datadog-checks-base', metadata, re.M), 'not an Agent check'
    root.put(f'/tmp/{wheel.name}', wheel.read_bytes())
    pip = [PYTHON, '-mpip', 'install', '--no-cache-dir', '--no-index', '--no-deps', f'/tmp/{wheel.name}',
           '--disable-pip-version-check']  # fmt: skip
    copy = (
        f'mkdir -p {CONFD} && for f in {SITE_PACKAGES}/datadog_checks/ebpf_probe/data/*; do '
        f'case "${{f##*/}}" in *.yaml*) cp "$f" {CONFD}/ ;; esac; done'
    )
    script = f'{shlex.join(pip)} && {copy}'
    command = ['sh', '-euc', script]
    if user:
        command = root.as_user(command, name=user)
    return root.run(command, env={'HOME': '/opt/datadog-agent'} if user else None).stdout


def readme_blocks(language: str) -> list[str]:
    """The fenced code blocks of the README in `language` (those in list items too, unindented)."""
    blocks = re.findall(rf'^( *)```{re.escape(language)}\n(.*?)^\1```', README.read_text(), re.M | re.S)
    return [textwrap.dedent(block) for _, block in blocks]
