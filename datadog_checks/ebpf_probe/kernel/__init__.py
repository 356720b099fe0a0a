# (C) ebpf_probe authors
# Licensed under a 3-clause BSD style license (see LICENSE)
"""The kernel layer both features share: libbpf and BCC bindings, BTF, what the kernel offers and allows."""
