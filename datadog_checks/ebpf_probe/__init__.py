# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
from .__about__ import __version__
from .check import EbpfProbeCheck

__all__ = ['__version__', 'EbpfProbeCheck']
