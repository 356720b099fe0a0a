# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Safe tags and markdown event text for an OOM kill: every kernel string is untrusted."""

import html
import re
import unicodedata

import markdown_it
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datadog_checks.ebpf_probe.containers import HIGH, Container
from datadog_checks.ebpf_probe.formatting import MAX_TAG_LENGTH, markdown_text, plain_text, tag
from datadog_checks.ebpf_probe.oom_kill import OOMKill, VictimMemory
from datadog_checks.ebpf_probe.oom_kill.record import OOMDomain, Parent
from datadog_checks.ebpf_probe.oom_kill.report import (
    aggregation_key,
    group_kill_text,
    group_kill_title,
    group_members_together,
    oom_kill_text,
    oom_kill_title,
)
from datadog_checks.ebpf_probe.oom_kill.report import oom_kill_tags as tags_at


def oom_kill_tags(kill, container):
    return tags_at(kill, container, HIGH)


pytestmark = pytest.mark.unit

CID = '31d305169b653acf5d1da39cf6b62718177caf8b611d228bb9f98ddf097aaa0d'
POD_UID = 'b7ceb4b4-c4de-4885-bafe-5e1f3f2acf19'
POD_UID_MD = POD_UID.replace('-', '\\-')  # as markdown_text shows it
CGROUP_PATH = f'/kubepods/burstable/pod{POD_UID}/{CID}'
CONTAINER = Container(CID, 'containerd', POD_UID)
MEMORY = VictimMemory(
    total_vm_kb=2_100_000, anon_rss_kb=1_048_000, file_rss_kb=1_200, shmem_rss_kb=64, pgtables_kb=2_100
)


def make_kill(**overrides) -> OOMKill:
    """An OOM kill in a Kubernetes container's memory cgroup, as the kprobe hook reports it."""
    fields = {
        'timestamp': 1_700_000_000.5,
        'victim_pid': 4242,
        'victim_tid': 4242,
        'victim_comm': 'stress-ng-vm',
        'victim_uid': 1000,
        'oom_score_adj': 937,
        'trigger_pid': 4243,
        'trigger_tid': 4244,
        'trigger_comm': 'stress-ng',
        'memcg_oom': True,
        'cgroup_path': CGROUP_PATH,
        'cgroup_id': 12345,
        'cgroup_path_truncated': False,
        'memory': MEMORY,
        'oom_domain_pages': 262_144,
        'badness_points': 257_000,
        'hook': 'kprobe/oom_kill_process',
    }
    fields.update(overrides)
    return OOMKill(**fields)


_ROW = re.compile(r'^\| (?P<label>[^|]+?) \| (?P<value>.*) \|$')


def table(text: str) -> dict[str, str]:
    """The event table as {label: cell}, skipping the empty header and the delimiter row."""
    lines = text.split('\n')
    rows = {}
    for line in lines[lines.index('|---|---|') + 1 : -1]:
        match = _ROW.match(line)
        assert match, f'not a table row: {line!r}'
        assert match['label'] not in rows
        rows[match['label']] = match['value']
    return rows


def has_control(text: str, allowed: str = '') -> bool:
    return any(unicodedata.category(c) == 'Cc' and c not in allowed for c in text)


# tag


@pytest.mark.parametrize(
    'value, expected',
    [
        pytest.param('nginx', 'process_name:nginx', id='plain'),
        pytest.param('kworker/u8:2', 'process_name:kworker/u8:2', id='slash-and-colon-kept'),
        pytest.param('a b,c|d#e', 'process_name:a_b_c_d_e', id='separators'),
        pytest.param('a , | # b', 'process_name:a_b', id='runs-collapse'),
        pytest.param('a\tb\nc\rd', 'process_name:a_b_c_d', id='whitespace'),
        pytest.param('a\x00b\x1bc\x7fd\x85e\x9ff', 'process_name:a_b_c_d_e_f', id='control'),
        pytest.param('a\u00a0b\u2028c', 'process_name:a_b_c', id='unicode-whitespace'),
        pytest.param('  nginx\n', 'process_name:nginx', id='stripped'),
        pytest.param('', 'process_name:unknown', id='empty'),
        pytest.param(' ,|#\n\x00', 'process_name:unknown', id='only-unsafe'),
        pytest.param('caf\\xc3', 'process_name:caf\\xc3', id='non-utf8-escape'),
        pytest.param('déjà-vu', 'process_name:déjà-vu', id='unicode-kept'),
        pytest.param(42, 'process_name:42', id='int'),
    ],
)
def test_tag(value, expected):
    assert tag('process_name', value) == expected


def test_tag_is_bounded():
    assert tag('cgroup_name', 'x' * 500) == 'cgroup_name:' + 'x' * (MAX_TAG_LENGTH - len('cgroup_name:'))
    assert len(tag('cgroup_name', 'x' * 500)) == MAX_TAG_LENGTH == 200
    assert tag('cgroup_name', 'x' * 188) == 'cgroup_name:' + 'x' * 188  # exactly 200: untouched


# markdown_text


@pytest.mark.parametrize(
    'value, expected',
    [
        pytest.param('stress-ng', 'stress\\-ng', id='dash'),
        pytest.param('nginx', 'nginx', id='plain'),
        pytest.param('**bold**', '\\*\\*bold\\*\\*', id='bold'),
        pytest.param('_a_ `b`', '\\_a\\_ \\`b\\`', id='emphasis-code'),
        pytest.param('[x](http://e)', '\\[x\\]\\(http://e\\)', id='link'),
        pytest.param('<img src=x>', '\\<img src=x\\>', id='html'),
        pytest.param('a|b', 'a\\|b', id='pipe'),
        pytest.param('# h', '\\# h', id='heading'),
        pytest.param('1. +x ~y~ !z {w}', '1\\. \\+x \\~y\\~ \\!z \\{w\\}', id='others'),
        pytest.param('a\\b', 'a\\\\b', id='backslash'),
        pytest.param('a\nb', 'a\\\\x0ab', id='newline-visible'),
        pytest.param('\x00\x1b\x7f\x9f', '\\\\x00\\\\x1b\\\\x7f\\\\x9f', id='control-visible'),
        pytest.param('caf\\xc3', 'caf\\\\xc3', id='non-utf8-escape'),
        pytest.param(7, '7', id='int'),
    ],
)
def test_markdown_text(value, expected):
    assert markdown_text(value) == expected


def test_plain_text_shows_control_characters():
    assert plain_text('a\nb\x00*') == 'a\\x0ab\\x00*'


# oom_kill_tags


def test_tags_of_a_container_kill():
    tags = oom_kill_tags(make_kill(), CONTAINER)
    assert set(tags) == {
        'trigger_type:cgroup',
        'trigger_process_name:stress-ng',
        'process_name:stress-ng-vm',
        f'cgroup_name:{CID}',
        f'container_id:{CID}',
        'container_runtime:containerd',
        f'pod_uid:{POD_UID}',
    }
    assert len(tags) == len(set(tags))


@pytest.mark.parametrize('memcg_oom, trigger_type', [(True, 'cgroup'), (False, 'system'), (None, 'unknown')])
def test_trigger_type_tag(memcg_oom, trigger_type):
    tags = oom_kill_tags(make_kill(memcg_oom=memcg_oom), None)
    assert [t for t in tags if t.startswith('trigger_type:')] == [f'trigger_type:{trigger_type}']


def test_tags_of_a_host_kill():
    kill = make_kill(memcg_oom=False, cgroup_path='/system.slice/mysqld.service', victim_comm='mysqld')
    assert set(oom_kill_tags(kill, None)) == {
        'trigger_type:system',
        'trigger_process_name:stress-ng',
        'process_name:mysqld',
        'cgroup_name:mysqld.service',
    }


def test_tags_without_victim_task():
    tags = oom_kill_tags(make_kill(victim_comm=None), None)
    assert not [t for t in tags if t.startswith('process_name:')]
    assert 'trigger_process_name:stress-ng' in tags


def test_tags_without_cgroup_path():
    tags = oom_kill_tags(make_kill(cgroup_path=None), None)
    assert set(tags) == {'trigger_type:cgroup', 'trigger_process_name:stress-ng', 'process_name:stress-ng-vm'}


def test_tag_of_the_root_cgroup():
    assert 'cgroup_name:/' in oom_kill_tags(make_kill(cgroup_path='/', memcg_oom=False), None)


def test_tags_of_a_pod_level_cgroup():
    pod_path = f'/kubepods/burstable/pod{POD_UID}'
    tags = oom_kill_tags(make_kill(cgroup_path=pod_path), Container(None, None, POD_UID))
    assert f'pod_uid:{POD_UID}' in tags
    assert f'cgroup_name:pod{POD_UID}' in tags
    assert not [t for t in tags if t.startswith(('container_id:', 'container_runtime:'))]


def test_tags_of_a_container_without_runtime():
    tags = oom_kill_tags(make_kill(), Container(CID, None, None))
    assert f'container_id:{CID}' in tags
    assert not [t for t in tags if t.startswith(('container_runtime:', 'pod_uid:'))]


def test_tags_are_sanitized_and_bounded():
    kill = make_kill(victim_comm='evil, name|#x', trigger_comm='a\nb', cgroup_path='/system.slice/' + 'y' * 300)
    tags = oom_kill_tags(kill, None)
    assert 'process_name:evil_name_x' in tags
    assert 'trigger_process_name:a_b' in tags
    assert 'cgroup_name:' + 'y' * (200 - len('cgroup_name:')) in tags
    assert all(len(t) <= 200 for t in tags)


# oom_kill_title


def test_title():
    assert oom_kill_title(make_kill()) == 'OOM kill: stress-ng-vm (pid 4242)'


def test_title_without_victim_task():
    assert oom_kill_title(make_kill(victim_comm=None)) == 'OOM kill: process (pid 4242)'


def test_title_shows_control_characters_and_is_not_markdown():
    assert oom_kill_title(make_kill(victim_comm='a\nb*c\x00')) == 'OOM kill: a\\x0ab*c\\x00 (pid 4242)'


# oom_kill_text


def test_text_of_a_container_kill():
    text = oom_kill_text(make_kill(), CONTAINER)
    lines = text.split('\n')
    assert lines[:5] == [
        '%%%',
        "**stress\\-ng\\-vm** (pid 4242) was killed by the kernel's OOM killer: a memory cgroup reached its limit.",
        '',
        '| | |',
        '|---|---|',
    ]
    assert lines[-1] == '%%%'
    assert table(text) == {
        'Victim': '**stress\\-ng\\-vm** (pid 4242, uid 1000, oom_score_adj 937)',
        'Triggered by': '**stress\\-ng** (pid 4243)',
        'Constraint': 'a memory cgroup reached its limit (trigger_type:cgroup)',
        'Memory cgroup': f'/kubepods/burstable/pod{POD_UID_MD}/{CID}',
        'OOM domain size': "262,144 pages; victim's badness 257,000 points",
        'Container': f'{CID} (containerd)',
        'Pod': f'uid {POD_UID_MD}',
        'Memory': 'rss 1,049,264 kB (anon 1,048,000 kB, file 1,200 kB, shmem 64 kB), total-vm 2,100,000 kB, '
        'page tables 2,100 kB',
        'Seen by': 'kprobe/oom_kill_process',
    }


@pytest.mark.parametrize(
    'memcg_oom, constraint, trigger_type',
    [
        (True, 'a memory cgroup reached its limit', 'cgroup'),
        (False, 'the system ran out of memory', 'system'),
        (
            None,
            'unknown (the kernel did not say whether a memory cgroup or the system was out of memory)',
            'unknown',
        ),
    ],
)
def test_text_constraint(memcg_oom, constraint, trigger_type):
    text = oom_kill_text(make_kill(memcg_oom=memcg_oom), None)
    assert text.split('\n')[1].endswith(f"killed by the kernel's OOM killer: {constraint}.")
    assert table(text)['Constraint'] == f'{constraint} (trigger_type:{trigger_type})'


def test_text_without_victim_task():
    text = oom_kill_text(make_kill(victim_comm=None, victim_uid=None, oom_score_adj=None), None)
    assert text.split('\n')[1].startswith("a process (pid 4242) was killed by the kernel's OOM killer")
    assert table(text)['Victim'] == 'a process (pid 4242)'
    assert 'None' not in text


def test_text_of_a_minimal_kill():
    kill = make_kill(cgroup_path=None, memory=None, oom_domain_pages=None, badness_points=None, memcg_oom=None)
    rows = table(oom_kill_text(kill, None))
    assert list(rows) == ['Victim', 'Triggered by', 'Constraint', 'Seen by']


def test_text_oom_domain_size_without_oom_control():
    assert 'OOM domain size' not in table(oom_kill_text(make_kill(oom_domain_pages=None, badness_points=None), None))


def test_text_badness_only_for_the_chosen_victim():
    rows = table(oom_kill_text(make_kill(badness_points=None), None))
    assert rows['OOM domain size'] == '262,144 pages'


def test_text_without_memory():
    rows = table(oom_kill_text(make_kill(memory=None), None))
    assert 'Memory' not in rows
    assert 'OOM domain size' in rows


def test_text_of_a_host_cgroup():
    rows = table(oom_kill_text(make_kill(cgroup_path='/system.slice/mysqld.service', memcg_oom=False), None))
    assert rows['Memory cgroup'] == '/system\\.slice/mysqld\\.service'
    assert 'Container' not in rows
    assert 'Pod' not in rows


def test_text_of_a_pod_level_cgroup():
    rows = table(oom_kill_text(make_kill(), Container(None, None, POD_UID, 'besteffort')))
    assert 'Container' not in rows
    assert rows['Pod'] == f'uid {POD_UID_MD}, QoS besteffort'


def test_text_of_a_container_without_runtime():
    rows = table(oom_kill_text(make_kill(), Container(CID, None, None)))
    assert rows['Container'] == CID
    assert 'Pod' not in rows


def test_text_escapes_kernel_strings():
    kill = make_kill(victim_comm='x|y\nz', trigger_comm='**t**', cgroup_path='/a|b/c\r\n| evil | row |')
    text = oom_kill_text(kill, None)
    rows = table(text)
    assert list(rows) == [
        'Victim',
        'Triggered by',
        'Constraint',
        'Memory cgroup',
        'OOM domain size',
        'Memory',
        'Seen by',
    ]
    assert rows['Victim'].startswith('**x\\|y\\\\x0az** (pid 4242')
    assert rows['Triggered by'] == '**\\*\\*t\\*\\*** (pid 4243)'
    assert rows['Memory cgroup'] == '/a\\|b/c\\\\x0d\\\\x0a\\| evil \\| row \\|'


# aggregation_key


def test_aggregation_key_is_the_container():
    assert aggregation_key(make_kill(), CONTAINER) == CID


def test_aggregation_key_is_the_cgroup_without_container():
    host = '/system.slice/mysqld.service'
    assert aggregation_key(make_kill(cgroup_path=host), None) == host
    pod = f'/kubepods/burstable/pod{POD_UID}'
    assert aggregation_key(make_kill(cgroup_path=pod), Container(None, None, POD_UID)) == pod


def test_aggregation_key_is_bounded():
    path = '/system.slice/' + 'z' * 200
    assert aggregation_key(make_kill(cgroup_path=path), None) == path[:100]


def test_aggregation_key_without_cgroup():
    assert aggregation_key(make_kill(cgroup_path=None), None) == 'system'


# Properties: arbitrary kernel strings.

_NASTY = ',|#: \t\n\r\x00\x01\x1b\x7f\x85\x9f\xa0\u2028\u3000*_`[]()<>~!+-.\\{}%&=\'"'
kernel_strings = st.one_of(
    st.text(),
    st.text(st.sampled_from(_NASTY) | st.characters(min_codepoint=0x20, max_codepoint=0x7E)),
    # As oom_kill._text decodes them: bytes that are not UTF-8 become '\\xNN' text.
    st.binary(max_size=128).map(lambda raw: raw.decode('utf-8', 'backslashreplace')),
    # Very long: repeated, so generation stays cheap.
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=10), st.integers(min_value=20, max_value=300)),
)
optional_strings = st.none() | kernel_strings
containers = st.none() | st.builds(Container, id=optional_strings, runtime=optional_strings, pod_uid=optional_strings)
TAG_KEYS = ['process_name', 'trigger_process_name', 'cgroup_name', 'container_id', 'container_runtime', 'pod_uid']


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TAG_KEYS), kernel_strings)
def test_tag_is_always_safe(key, value):
    result = tag(key, value)
    assert result.startswith(f'{key}:')
    assert len(result) > len(key) + 1
    assert len(result) <= MAX_TAG_LENGTH
    assert not any(c.isspace() for c in result)
    assert not set(result) & {',', '|', '#'}
    assert not has_control(result)


@settings(max_examples=200, deadline=None)
@given(
    victim_comm=optional_strings,
    trigger_comm=kernel_strings,
    cgroup_path=optional_strings,
    memcg_oom=st.none() | st.booleans(),
    container=containers,
)
def test_text_is_always_well_formed(victim_comm, trigger_comm, cgroup_path, memcg_oom, container):
    kill = make_kill(victim_comm=victim_comm, trigger_comm=trigger_comm, cgroup_path=cgroup_path, memcg_oom=memcg_oom)
    text = oom_kill_text(kill, container)
    assert text.startswith('%%%\n')
    assert text.endswith('\n%%%')
    assert not has_control(text, allowed='\n')
    lines = text.split('\n')
    inner = lines[1:-1]
    assert lines[1] != '%%%' and lines[-2] != '%%%'
    for line in inner:
        if line.startswith('|'):
            assert line.endswith('|'), line
    # Nothing a kernel string holds adds or splits a line: sentence, blank, header, delimiter, then rows.
    assert all(line.startswith('|') for line in inner[2:])
    expected_rows = 4 + (cgroup_path is not None) + 2  # victim, trigger, constraint, seen by; memory, OOM domain
    expected_rows += container is not None and bool(container.id)
    expected_rows += container is not None and bool(container.pod_uid)
    assert len(table(text)) == expected_rows
    assert len(inner) == 4 + expected_rows


@settings(max_examples=200, deadline=None)
@given(victim_comm=optional_strings, victim_pid=st.integers(min_value=1, max_value=4_194_304))
def test_title_is_always_plain(victim_comm, victim_pid):
    title = oom_kill_title(make_kill(victim_comm=victim_comm, victim_pid=victim_pid))
    assert not has_control(title)
    assert title.startswith('OOM kill: ')
    assert title.endswith(f' (pid {victim_pid})')
    assert '\n' not in title


# Rendering: markdown_text must show the kernel string literally, also inside a table cell.


def _rendered_cell(value: str) -> str:
    md = markdown_it.MarkdownIt('commonmark').enable('table')
    rendered = md.render(f'| h |\n|---|\n| {markdown_text(value)} |\n')
    match = re.search(r'<tbody>\s*<tr>\s*<td>(.*?)</td>\s*</tr>\s*</tbody>', rendered, re.S)
    assert match, rendered
    return html.unescape(match.group(1))


@settings(max_examples=200, deadline=None)
@given(kernel_strings)
def test_markdown_text_renders_literally(value):
    # Cells are trimmed of whitespace when rendered; everything else must come out as it went in.
    assert _rendered_cell(value).strip() == plain_text(value).strip()


@pytest.mark.parametrize('value', ['&amp;', '&lt;b&gt;', 'a&copy;b', '%%%', 'a%%%b'])
def test_markdown_text_renders_entities_literally(value):
    assert _rendered_cell(value) == value


# --- The context of a kill: the cgroup that ran out, the container's main process, groups ----------


def test_text_names_the_cgroup_that_ran_out_when_it_is_not_the_victims():
    pod = CGROUP_PATH.rsplit('/', 1)[0]
    kill = make_kill(domain=OOMDomain(pod, 3, 1_048_576, 1_048_576, guessed=False))
    rows = table(oom_kill_text(kill, CONTAINER))
    assert rows['Out of memory'] == f'{markdown_text(pod)}: usage 1,048,576 kB of a 1,048,576 kB limit'
    assert rows['Note'].startswith("the victim's own cgroup did not reach a limit")


def test_text_of_a_victim_whose_own_cgroup_ran_out_has_no_note():
    kill = make_kill(domain=OOMDomain(CGROUP_PATH, 4, 100, 200, guessed=True))
    rows = table(oom_kill_text(kill, CONTAINER))
    assert rows['Out of memory'].endswith('usage 100 kB of a 200 kB limit')
    assert 'Note' not in rows


@pytest.mark.parametrize(
    'ns_pid, level, parent, main, row',
    [
        (1, 1, None, True, "the container's main process (pid 1 in its pid namespace): the kernel ends every"),
        (2, 1, Parent(900, 'tini', 1, True), True,
         "the container's main process (pid 2 in its pid namespace): the child its init **tini** (pid 1) started"),
        (2, 1, Parent(900, 'catatonit', 1, True), True, "the container's main process (pid 2"),
        (7, 1, Parent(900, 'docker-init', 1, False), False,
         'not the main process (pid 7 in its pid namespace): an orphan its init **docker\\-init** (pid 1) adopted'),
        (37, 1, Parent(900, 'gunicorn', 2, False), False,
         'not the main process (pid 37 in its pid namespace): a child of **gunicorn** (pid 2 there)'),
        (37, 1, Parent(900, 'sh', 1, True), None,
         'pid 37 in its pid namespace, a child of its pid 1 **sh**: whether the container stopped depends'),
        (5, 1, Parent(900, 'containerd-shim', None, True), None,
         'pid 5 in its pid namespace, started into it from outside by **containerd\\-shim** (host pid 900)'),
        (5, 1, None, None, 'pid 5 in its pid namespace; whether its death stopped the container is not known'),
        (4242, 0, Parent(1, 'systemd', 1, False), None, None),
    ],
    ids=['pid-1', 'tini', 'catatonit', 'adopted', 'worker', 'other-init', 'entered', 'unread-parent', 'host'],
)  # fmt: skip
def test_whether_the_victims_death_stopped_its_container(ns_pid, level, parent, main, row):
    kill = make_kill(ns_pid=ns_pid, pid_ns_level=level, parent=parent)
    assert kill.container_main_process is main
    rows = table(oom_kill_text(kill, CONTAINER))
    if row is None:
        assert 'Process' not in rows
    else:
        assert rows['Process'].startswith(row)
    if main is None:
        assert not any(t.startswith('container_main_process:') for t in oom_kill_tags(kill, CONTAINER))
        assert 'container goes on' not in rows.get('Process', '')
    else:
        assert f'container_main_process:{str(main).lower()}' in oom_kill_tags(kill, CONTAINER)


def group(n: int, start: float = 1_700_000_000.0, path: str = '/kubepods/pod/app', trigger: int = 9):
    return [
        make_kill(timestamp=start + i * 0.001, victim_pid=100 + i, group_cgroup_path=path, trigger_tid=trigger,
                  chosen=i == 0)
        for i in range(n)
    ]  # fmt: skip


def test_the_members_of_a_group_kill_are_one_occurrence():
    lone = make_kill(victim_pid=7)
    first, second = group(3), group(2, path='/kubepods/pod/other')
    later = group(2, start=1_700_000_060.0)  # the same cgroup killed again a minute later
    assert group_members_together([lone, *first, *second, *later]) == [[lone], first, second, later]


def test_a_group_kill_event_lists_every_member():
    kills = group(3)
    assert group_kill_title(kills) == 'OOM group kill: 3 processes in app'
    text = group_kill_text(kills, CONTAINER)
    member_rows = [line for line in text.split('\n') if line.startswith('| **stress')]
    assert [row.split('|')[1].strip() for row in member_rows] == [
        f'**stress\\-ng\\-vm** (pid {pid})' for pid in (100, 101, 102)
    ]
    assert member_rows[0].endswith('| chosen by the OOM killer |')
    assert all(row.endswith('| killed with the group |') for row in member_rows[1:])
    assert 'memory.oom.group set' in text
    assert all('oom_group:true' in oom_kill_tags(k, CONTAINER) for k in kills)


# --- kills sent from user space ----------------------------------------------------------------------


def signal_kill(number: int = 9, after_sigterm: bool = False, limit_kb: int = 65_536, **memory) -> OOMKill:
    from datadog_checks.ebpf_probe.oom_kill.record import CgroupMemory, KillSignal

    cgroup = CgroupMemory(
        level=2,
        usage_kb=60_000,
        limit_kb=limit_kb,
        events=memory.get('events', {'low': 0, 'high': 3, 'max': 12, 'oom': 0, 'oom_kill': 0}),
        pressure_some_avg10=memory.get('some', 41.5),
        pressure_full_avg10=memory.get('full', 20.25),
    )
    return make_kill(
        trigger_comm='earlyoom', trigger_pid=77, memcg_oom=None, oom_domain_pages=None, badness_points=None,
        hook='tp_btf/signal_generate', signal=KillSignal(number, 1, cgroup, after_sigterm),
    )  # fmt: skip


@pytest.mark.parametrize(
    'number, after_sigterm, said',
    [
        (9, False, 'SIGKILL'),
        (9, True, 'SIGTERM, then SIGKILL (the process was still there)'),
        (15, False, 'SIGTERM: the process was gone by the next check run'),
    ],
)
def test_a_memory_killers_kill_says_who_which_signals_and_the_cgroup_then(number, after_sigterm, said):
    from datadog_checks.ebpf_probe.oom_kill.report import signal_kill_text, signal_kill_title

    kill = signal_kill(number, after_sigterm)
    assert signal_kill_title(kill, 'memory_killer') == 'Memory kill by earlyoom: stress-ng-vm (pid 4242)'
    rows = table(signal_kill_text(kill, None, 'memory_killer'))
    assert rows['Killed by'] == '**earlyoom** (pid 77): a user-space memory killer (memory_killers)'
    assert rows['Signals'] == said
    assert rows['Memory cgroup use'] == '60,000 kB of a 65,536 kB limit, when the signal was sent'
    assert rows['memory.events'] == 'low 0, high 3, max 12, oom 0, oom_kill 0'
    assert rows['Memory pressure'] == 'some avg10=41.50%, full avg10=20.25%'
    assert 'Triggered by' not in rows and 'Constraint' not in rows  # no OOM: nothing to say of one


def test_what_the_kernel_keeps_from_users_is_not_shown():
    from datadog_checks.ebpf_probe.oom_kill.report import signal_kill_text

    rows = table(signal_kill_text(signal_kill(limit_kb=1 << 52, events={}, some=None, full=None), None, 'other'))
    assert rows['Memory cgroup use'] == '60,000 kB, no limit, when the signal was sent'
    assert 'memory.events' not in rows and 'Memory pressure' not in rows


def test_a_container_stopped_by_its_runtime_is_exit_137_with_no_oom():
    from datadog_checks.ebpf_probe.oom_kill.report import signal_kill_text, signal_kill_title

    kill = signal_kill()
    kill = OOMKill(**{**kill.__dict__, 'trigger_comm': 'crun', 'ns_pid': 1, 'pid_ns_level': 1})
    title = signal_kill_title(kill, 'container_runtime')
    assert title == "Container's main process killed by crun (SIGKILL, exit 137): stress-ng-vm (pid 4242)"
    text = signal_kill_text(kill, None, 'container_runtime')
    assert 'the container stopped with exit code 137, and no OOM kill was involved' in text
    assert "a Kubernetes eviction or a failed liveness probe; the pod's Kubernetes events tell which" in text
