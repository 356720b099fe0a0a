# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
