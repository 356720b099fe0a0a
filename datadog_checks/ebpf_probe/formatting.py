# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""Turning kernel strings into safe tags and event text, for both features. Pure functions, no I/O.

Process names and cgroup paths come from whoever named the process or cgroup:
they may hold separators, newlines, markdown or bytes that are not UTF-8.
"""

from __future__ import annotations

import re

MAX_TAG_LENGTH = 200
# Characters that break tags on some path to Datadog: DogStatsD separators, whitespace, control.
_TAG_UNSAFE = re.compile(r'[\s,|#\x00-\x1f\x7f-\x9f]+')
_CONTROL = re.compile(r'[\x00-\x1f\x7f-\x9f]')
_MARKDOWN_SPECIAL = re.compile(r'([\\`*_{}\[\]()#+\-.!|<>~&%])')  # '%': '%%%' delimits event markdown


def tag(key: str, value: object) -> str:
    """A `key:value` tag with unsafe characters replaced by '_' and the length bounded."""
    text = _TAG_UNSAFE.sub('_', str(value)).strip('_') or 'unknown'
    return f'{key}:{text}'[:MAX_TAG_LENGTH]


def _visible(text: str) -> str:
    """Control characters (newlines included) as \\xNN escapes."""
    return _CONTROL.sub(lambda m: f'\\x{ord(m.group()):02x}', text)


def markdown_text(value: object) -> str:
    """Any kernel string, shown literally in markdown."""
    return _MARKDOWN_SPECIAL.sub(r'\\\1', _visible(str(value)))


def plain_text(value: object) -> str:
    return _visible(str(value))


def kb(value: int) -> str:
    return f'{value:,} kB'
