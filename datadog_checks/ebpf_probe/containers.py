# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Container and pod ids from a cgroup path, for every common runtime and cgroup driver."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .formatting import tag

# Leaf-name prefixes (systemd cgroup driver: '<prefix>-<id>.scope') and the runtime they name.
_SCOPE_PREFIXES = (
    ('cri-containerd-', 'containerd'),
    ('docker-', 'docker'),
    ('crio-', 'cri-o'),
    ('libpod-', 'podman'),
    ('nerdctl-', 'containerd'),
    ('containerd-', 'containerd'),
)
# Helper processes that live beside a container, not in it.
_NOT_CONTAINERS = ('crio-conmon-', 'libpod-conmon-')
# Parent folder (cgroupfs driver: '/<parent>/<id>') and the runtime it names.
_PARENT_RUNTIMES = {'docker': 'docker', 'libpod_parent': 'podman', 'lxc.payload': 'lxc', 'actions_job': 'docker'}

_CONTAINER_ID = re.compile(r'[0-9a-f]{64}|[0-9a-f]{32}-\d+')  # 64 hex; ECS Fargate: 32 hex-digits
_POD_UID = re.compile(r'pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?\Z')


# The Agent's tag cardinalities, from fewest series to most.
LOW, ORCHESTRATOR, HIGH = 'low', 'orchestrator', 'high'
CARDINALITIES = (LOW, ORCHESTRATOR, HIGH)

# The Kubernetes QoS classes, as the kubelet names their cgroups ('kubepods-burstable.slice').
_QOS_CLASSES = ('burstable', 'besteffort')


@dataclass(frozen=True)
class Container:
    id: str | None
    runtime: str | None
    pod_uid: str | None
    qos_class: str | None = None  # of the pod: guaranteed, burstable or besteffort


def _qos_class(parts: list[str], pod_level: int) -> str | None:
    """A pod's QoS class from the levels above it: its own cgroup for burstable and best-effort
    pods, none (the pod right under kubepods) for guaranteed ones."""
    above = parts[:pod_level]
    kubepods = next((i for i, part in enumerate(above) if part.startswith('kubepods')), None)
    if kubepods is None:
        return None
    above = above[kubepods:]  # a kind node's own cgroups may come first
    for qos in _QOS_CLASSES:
        if any(part in (qos, f'kubepods-{qos}.slice') for part in above):
            return qos
    return 'guaranteed'


def parse_cgroup_path(path: str | None) -> Container | None:
    """The container (and Kubernetes pod) a cgroup path belongs to, or None for a host cgroup.

    Handles the cgroupfs and systemd drivers of Docker, containerd (CRI and nerdctl), CRI-O and
    Podman, e.g. '/kubepods/burstable/pod<uid>/<id>' or
    '/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope'.
    """
    if not path:
        return None
    parts = [p for p in path.split('/') if p]
    container_id = runtime = pod_uid = qos = None
    for depth in range(len(parts) - 1, -1, -1):
        name = parts[depth]
        if container_id is None:
            container_id, runtime = _container_id(name, parts[depth - 1] if depth else None)
        if pod_uid is None:
            match = _POD_UID.search(name)
            if match:
                pod_uid = match.group(1).replace('_', '-')
                qos = _qos_class(parts, depth)
    if container_id is None and pod_uid is None:
        return None
    if container_id and runtime is None and pod_uid is not None:
        runtime = 'kubernetes'
    return Container(container_id, runtime, pod_uid, qos)


def _container_id(name: str, parent: str | None) -> tuple[str | None, str | None]:
    if name.startswith(_NOT_CONTAINERS):
        return None, None
    runtime = None
    stem = name
    if stem.endswith('.scope'):
        stem = stem[: -len('.scope')]
    for prefix, prefix_runtime in _SCOPE_PREFIXES:
        if stem.startswith(prefix):
            stem, runtime = stem[len(prefix) :], prefix_runtime
            break
    if not _CONTAINER_ID.fullmatch(stem):
        return None, None
    if runtime is None and parent is not None:
        runtime = _PARENT_RUNTIMES.get(parent)
    return stem, runtime


def cgroup_tags(cgroup_name: str | None, container: Container | None, cardinality: str) -> list[str]:
    """A cgroup's own tags, as many as the cardinality allows (the Agent's rules: a pod is orchestrator
    cardinality, a container high; a host cgroup, i.e. a service, is bounded, so named at any)."""
    if container is None:
        return [tag('cgroup_name', cgroup_name)] if cgroup_name is not None else []
    level = CARDINALITIES.index(cardinality)
    tags = []
    if container.runtime:
        tags.append(tag('container_runtime', container.runtime))
    if container.qos_class:
        tags.append(tag('kube_qos', container.qos_class))
    if container.pod_uid and level >= CARDINALITIES.index(ORCHESTRATOR):
        tags.append(tag('pod_uid', container.pod_uid))
    if level >= CARDINALITIES.index(HIGH):
        if container.id:
            tags.append(tag('container_id', container.id))
        if cgroup_name is not None:
            tags.append(tag('cgroup_name', cgroup_name))
    return tags
