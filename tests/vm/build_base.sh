#!/bin/bash
# Build the second kernel's world, cached under .cache/vm (run as root, by `make test-kernels`):
#   vmlinuz    Debian 12's own kernel (linux-image-amd64), taken out of its package: nothing
#              is installed on the host.
#   base.cpio  a Debian 12 root (debootstrap, minbase) with Python, libbpf and bpftool, and the
#              check's Python dependencies (pip --target with the host's Python 3.11, the same
#              version as the guest's), packed as an initramfs: the kernel unpacks it into RAM
#              and runs /init from it, so no disk driver or module is needed.
# The wheel of this checkout is added at each run as a second cpio archive (tests/vm/test_*.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=.cache/vm
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$CACHE"

if [ ! -s "$CACHE/vmlinuz" ]; then
	package=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	rm -rf "$CACHE/kernel" && mkdir -p "$CACHE/kernel"
	(cd "$CACHE/kernel" && apt-get download "$package" 2>/dev/null && dpkg-deb -x ./*.deb .)
	cp "$CACHE"/kernel/boot/vmlinuz-* "$CACHE/vmlinuz.tmp"
	cp "$CACHE"/kernel/boot/config-* "$CACHE/config"
	rm -rf "$CACHE/kernel"
	mv "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
fi

if [ ! -s "$CACHE/base.cpio" ]; then
	root="$CACHE/rootfs"
	rm -rf "$root"
	debootstrap --variant=minbase --include=python3,libbpf1,bpftool,procps \
		bookworm "$root" http://deb.debian.org/debian >"$CACHE/debootstrap.log"
	"$PIP" install -q --disable-pip-version-check --target "$root/opt/ebpf-probe/site-packages" \
		"datadog-checks-base[deps]"
	# Compiled once here: the guest runs under software emulation, where every import counts.
	/usr/bin/python3 -m compileall -q -j 0 "$root/opt/ebpf-probe/site-packages" >/dev/null || true
	rm -rf "$root"/usr/share/{doc,man,info,locale} "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
	(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) >"$CACHE/base.cpio.tmp"
	rm -rf "$root"
	mv "$CACHE/base.cpio.tmp" "$CACHE/base.cpio"
fi
ls -la "$CACHE"
