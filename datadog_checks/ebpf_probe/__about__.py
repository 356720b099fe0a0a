# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
__version__ = '0.1.0'
