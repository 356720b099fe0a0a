# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The wheel of this checkout, as users get it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build_wheel(out: Path) -> Path:
    """`python -m build --wheel` of the checkout into out (the BPF objects and the bundled libbpf built)."""
    subprocess.run(
        [sys.executable, '-m', 'build', '--wheel', '--outdir', str(out), str(REPO)], check=True, capture_output=True
    )
    [path] = out.glob('datadog_ebpf_probe-*.whl')
    return path
