# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""parse_cgroup_path: container id, runtime and Kubernetes pod uid from the victim's cgroup path."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datadog_checks.ebpf_probe.containers import Container, parse_cgroup_path

pytestmark = pytest.mark.unit

CID = '31d305169b653acf5d1da39cf6b62718177caf8b611d228bb9f98ddf097aaa0d'
CID2 = 'f5aa441fc3f16c4c526036d40c0df536145fdc9de6d209d775dd2ce6918231fe'
POD_UID = 'b7ceb4b4-c4de-4885-bafe-5e1f3f2acf19'
POD_UID_SYSTEMD = POD_UID.replace('-', '_')  # the systemd driver writes the uid with underscores
FARGATE_TASK = '0de8235ae3673e254b38eb15f090dfcb'
FARGATE_CID = f'{FARGATE_TASK}-2785427151'

CONTAINER_PATHS = [
    # Docker, cgroupfs driver.
    pytest.param(f'/docker/{CID}', Container(CID, 'docker', None), id='docker-cgroupfs'),
    pytest.param(f'/docker/{CID}/', Container(CID, 'docker', None), id='docker-cgroupfs-trailing-slash'),
    # Docker, systemd driver.
    pytest.param(f'/system.slice/docker-{CID}.scope', Container(CID, 'docker', None), id='docker-systemd'),
    # Docker in Docker: the innermost container.
    pytest.param(f'/docker/{CID2}/docker/{CID}', Container(CID, 'docker', None), id='docker-in-docker'),
    # A cgroup the container made inside its own (e.g. systemd in the container).
    pytest.param(
        f'/system.slice/docker-{CID}.scope/init.scope', Container(CID, 'docker', None), id='docker-systemd-child'
    ),
    # GitHub Actions job containers.
    pytest.param(f'/actions_job/{CID}', Container(CID, 'docker', None), id='actions-job'),
    # containerd CRI in Kubernetes, cgroupfs driver: the runtime is not in the path.
    pytest.param(
        f'/kubepods/burstable/pod{POD_UID}/{CID}',
        Container(CID, 'kubernetes', POD_UID, 'burstable'),
        id='k8s-cgroupfs-burstable',
    ),
    pytest.param(
        f'/kubepods/besteffort/pod{POD_UID}/{CID}',
        Container(CID, 'kubernetes', POD_UID, 'besteffort'),
        id='k8s-cgroupfs-besteffort',
    ),
    pytest.param(
        f'/kubepods/pod{POD_UID}/{CID}',
        Container(CID, 'kubernetes', POD_UID, 'guaranteed'),
        id='k8s-cgroupfs-guaranteed',
    ),
    # containerd CRI in Kubernetes, systemd driver.
    pytest.param(
        '/kubepods.slice/kubepods-burstable.slice/'
        f'kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope',
        Container(CID, 'containerd', POD_UID, 'burstable'),
        id='k8s-containerd-systemd-burstable',
    ),
    pytest.param(
        '/kubepods.slice/kubepods-besteffort.slice/'
        f'kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope',
        Container(CID, 'containerd', POD_UID, 'besteffort'),
        id='k8s-containerd-systemd-besteffort',
    ),
    pytest.param(
        f'/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope',
        Container(CID, 'containerd', POD_UID, 'guaranteed'),
        id='k8s-containerd-systemd-guaranteed',
    ),
    # Docker (dockershim / cri-dockerd) under Kubernetes, systemd driver.
    pytest.param(
        f'/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/docker-{CID}.scope',
        Container(CID, 'docker', POD_UID, 'burstable'),
        id='k8s-docker-systemd',
    ),
    # kind: a Kubernetes node that is itself a Docker container; the pod's container wins.
    pytest.param(
        f'/docker/{CID2}/kubepods/burstable/pod{POD_UID}/{CID}',
        Container(CID, 'kubernetes', POD_UID, 'burstable'),
        id='kind-node',
    ),
    # CRI-O, systemd driver (also with the 'container' child cgroup CRI-O may create).
    pytest.param(
        f'/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/crio-{CID}.scope',
        Container(CID, 'cri-o', POD_UID, 'burstable'),
        id='crio-systemd',
    ),
    pytest.param(
        '/kubepods.slice/kubepods-besteffort.slice/'
        f'kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/crio-{CID}.scope/container',
        Container(CID, 'cri-o', POD_UID, 'besteffort'),
        id='crio-systemd-container-child',
    ),
    # CRI-O, cgroupfs driver.
    pytest.param(
        f'/kubepods/burstable/pod{POD_UID}/crio-{CID}',
        Container(CID, 'cri-o', POD_UID, 'burstable'),
        id='crio-cgroupfs',
    ),
    # Podman, systemd driver (rootful and rootless).
    pytest.param(f'/machine.slice/libpod-{CID}.scope', Container(CID, 'podman', None), id='podman-systemd'),
    pytest.param(
        f'/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container',
        Container(CID, 'podman', None),
        id='podman-rootless',
    ),
    # Podman, cgroupfs driver.
    pytest.param(f'/libpod_parent/libpod-{CID}', Container(CID, 'podman', None), id='podman-cgroupfs'),
    # nerdctl (containerd without Kubernetes), systemd driver.
    pytest.param(f'/system.slice/nerdctl-{CID}.scope', Container(CID, 'containerd', None), id='nerdctl-systemd'),
    # nerdctl, cgroupfs driver: '/<namespace>/<id>' does not name the runtime.
    pytest.param(f'/default/{CID}', Container(CID, None, None), id='nerdctl-cgroupfs'),
    # ECS on Fargate: '<32 hex>-<digits>' container ids.
    pytest.param(f'/ecs/{FARGATE_TASK}/{FARGATE_CID}', Container(FARGATE_CID, None, None), id='ecs-fargate'),
    # LXC.
    pytest.param(f'/lxc.payload/{CID}', Container(CID, 'lxc', None), id='lxc'),
]


@pytest.mark.parametrize('path, expected', CONTAINER_PATHS)
def test_container_paths(path, expected):
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize(
    'path',
    [
        pytest.param(f'/kubepods/burstable/pod{POD_UID}', id='cgroupfs-burstable'),
        pytest.param(f'/kubepods/besteffort/pod{POD_UID}', id='cgroupfs-besteffort'),
        pytest.param(f'/kubepods/pod{POD_UID}', id='cgroupfs-guaranteed'),
        pytest.param(
            f'/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_SYSTEMD}.slice',
            id='systemd-burstable',
        ),
        pytest.param(
            f'/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice',
            id='systemd-besteffort',
        ),
        pytest.param(f'/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice', id='systemd-guaranteed'),
    ],
)
def test_pod_level_cgroup_has_pod_uid_only(path):
    qos = next((q for q in ('burstable', 'besteffort') if q in path), 'guaranteed')
    assert parse_cgroup_path(path) == Container(None, None, POD_UID, qos)


@pytest.mark.parametrize(
    'path',
    [
        pytest.param(
            '/kubepods.slice/kubepods-burstable.slice/'
            f'kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/crio-conmon-{CID}.scope',
            id='crio-conmon-systemd',
        ),
        pytest.param(f'/kubepods/burstable/pod{POD_UID}/crio-conmon-{CID}', id='crio-conmon-cgroupfs'),
    ],
)
def test_crio_conmon_in_pod_is_not_a_container(path):
    # conmon monitors the container from beside it: the pod is known, the container is not.
    assert parse_cgroup_path(path) == Container(None, None, POD_UID, 'burstable')


@pytest.mark.parametrize(
    'path',
    [
        pytest.param(f'/system.slice/crio-conmon-{CID}.scope', id='crio-conmon'),
        pytest.param(f'/machine.slice/libpod-conmon-{CID}.scope', id='libpod-conmon-systemd'),
        pytest.param(f'/libpod_parent/libpod-conmon-{CID}', id='libpod-conmon-cgroupfs'),
        pytest.param(
            f'/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-conmon-{CID}.scope',
            id='libpod-conmon-rootless',
        ),
    ],
)
def test_conmon_is_not_a_container(path):
    assert parse_cgroup_path(path) is None


@pytest.mark.parametrize(
    'path',
    [
        pytest.param('/', id='root'),
        pytest.param('/system.slice/sshd.service', id='sshd'),
        pytest.param('/system.slice/docker.service', id='docker-daemon'),
        pytest.param('/system.slice/containerd.service', id='containerd-daemon'),
        pytest.param('/user.slice/user-0.slice/session-1.scope', id='session'),
        pytest.param('/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox.scope', id='user-app'),
        pytest.param('/kubepods', id='kubepods'),
        pytest.param('/kubepods.slice/kubepods-burstable.slice', id='kubepods-qos-slice'),
        pytest.param(f'/docker/{CID[:63]}', id='63-hex'),
        pytest.param(f'/docker/{CID}a', id='65-hex'),
        pytest.param(f'/docker/{CID.upper()}', id='uppercase-hex'),
        pytest.param(f'/system.slice/docker-{CID.upper()}.scope', id='uppercase-hex-scope'),
        pytest.param(f'/system.slice/docker-{CID[:63]}.scope', id='63-hex-scope'),
        pytest.param(f'/docker/{CID[:63]}g', id='non-hex'),
        pytest.param(f'/ecs/{FARGATE_TASK}/{FARGATE_TASK}-', id='fargate-no-digits'),
        pytest.param(f'/kubepods/burstable/pod{POD_UID.upper()}', id='uppercase-pod-uid'),
        pytest.param(f'/kubepods/burstable/pod{POD_UID[:-1]}', id='short-pod-uid'),
    ],
)
def test_host_cgroups(path):
    assert parse_cgroup_path(path) is None


@pytest.mark.parametrize('path', [None, ''])
def test_no_path(path):
    assert parse_cgroup_path(path) is None


def test_trailing_newline_is_not_a_container_id():
    # Cgroup names may hold any byte but '/' and NUL: this is a host cgroup with an odd name.
    assert parse_cgroup_path(f'/docker/{CID}\n') is None


def test_trailing_newline_is_not_a_pod():
    assert parse_cgroup_path(f'/kubepods/burstable/pod{POD_UID}\n') is None


_ID = re.compile(r'[0-9a-f]{64}|[0-9a-f]{32}-\d+')
_UID = re.compile(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}')
_RUNTIMES = {None, 'docker', 'containerd', 'cri-o', 'podman', 'lxc', 'kubernetes'}

# Path segments: real ones, ids in every wrapper, and arbitrary names.
_segments = st.one_of(
    st.sampled_from(
        [
            'kubepods',
            'kubepods.slice',
            'burstable',
            'besteffort',
            'docker',
            'system.slice',
            'libpod_parent',
            'container',
            f'pod{POD_UID}',
            f'kubepods-burstable-pod{POD_UID_SYSTEMD}.slice',
        ]
    ),
    st.tuples(
        st.sampled_from(['', 'docker-', 'cri-containerd-', 'crio-', 'crio-conmon-', 'libpod-', 'libpod-conmon-']),
        st.sampled_from([CID, CID2, FARGATE_CID, CID[:63], CID.upper()]),
        st.sampled_from(['', '.scope', '.slice']),
    ).map(''.join),
    st.text(st.characters(exclude_characters='/', exclude_categories=('Cs',)), max_size=80),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_segments, max_size=8).map(lambda parts: '/' + '/'.join(parts)))
def test_any_path_gives_a_well_formed_result(path):
    container = parse_cgroup_path(path)
    if container is None:
        return
    assert container.id is not None or container.pod_uid is not None
    if container.id is not None:
        assert _ID.fullmatch(container.id)
        assert container.id in path
    assert container.runtime in _RUNTIMES
    if container.id is None:
        assert container.runtime is None
    if container.pod_uid is not None:
        assert _UID.fullmatch(container.pod_uid)
        assert container.pod_uid in path or container.pod_uid.replace('-', '_') in path


@pytest.mark.parametrize(
    'path, qos',
    [
        ('/kubepods/burstable/pod1b2c3d4e-1234-5678-9abc-def012345678/' + 'a' * 64, 'burstable'),
        ('/kubepods/besteffort/pod1b2c3d4e-1234-5678-9abc-def012345678/' + 'a' * 64, 'besteffort'),
        ('/kubepods/pod1b2c3d4e-1234-5678-9abc-def012345678/' + 'a' * 64, 'guaranteed'),
        ('/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_1234_5678_9abc_def012345678.slice/'
         'cri-containerd-' + 'a' * 64 + '.scope', 'burstable'),
        ('/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_1234_5678_9abc_def012345678.slice/'
         'crio-' + 'a' * 64 + '.scope', 'besteffort'),
        ('/kubepods.slice/kubepods-pod1b2c3d4e_1234_5678_9abc_def012345678.slice/docker-' + 'a' * 64 + '.scope',
         'guaranteed'),
        ('/docker/' + 'a' * 64, None),  # not a pod
    ],
    ids=['cgroupfs-burstable', 'cgroupfs-besteffort', 'cgroupfs-guaranteed', 'systemd-burstable',
         'systemd-besteffort', 'systemd-guaranteed', 'docker'],
)  # fmt: skip
def test_the_pods_qos_class_comes_from_its_cgroups_place(path, qos):
    assert parse_cgroup_path(path).qos_class == qos
