#!/bin/bash
# The tests' Agent-like runtime, cached in .cache/trixie (run as root, by `make agent-root`):
#   base/   Debian 13 (trixie), debootstrap's minbase: its Python 3.13 stands in for the Agent's
#           embedded Python (3.13 in current releases). The user dd-agent (uid 100, as in the Agent's
#           image), /etc/datadog-agent/conf.d, and /opt/datadog-agent/embedded: a venv without system
#           site-packages holding datadog-checks-base[deps] (what the Agent ships, the newest pip
#           resolves for 3.13) and nothing else, owned by dd-agent as the Agent's packages leave it.
#           No libbpf1, no BCC, no clang, no kernel headers: the wheel has to bring what it needs.
#   tools/  a layer over base (an overlay's upper folder): Debian's BCC (python3-bpfcc, which brings
#           libbcc and libbpf1), bpftool, strace and iproute2, and /opt/suite, a venv that sees the system's
#           packages (BCC) with what the test suite needs ($SUITE_PACKAGES): the suite under 3.13.
# A layer is rebuilt when this script (or, for tools, the package list) changes. Tests never write
# into the layers: tests/agent/in_root.sh stacks them under an overlay whose writes go elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=.cache/trixie
MIRROR=http://deb.debian.org/debian
IN_ROOT=tests/agent/in_root.sh
SUITE_PACKAGES=${SUITE_PACKAGES:-datadog-checks-base[deps] datadog-checks-dev pytest hypothesis hatchling}
# pip in the root trusts what this machine trusts, and resolves names as it does.
NETWORK=(-b /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
	-b /etc/resolv.conf:/etc/resolv.conf:ro)
PIP_INSTALL='pip install -q --no-cache-dir --disable-pip-version-check'
mkdir -p "$CACHE"

base_id=$(sha256sum "$0" | cut -c1-16)
tools_id=$(printf '%s %s' "$base_id" "$SUITE_PACKAGES" | sha256sum | cut -c1-16)

# The folder a layer was built in (an in_root.sh UPPER) becomes the layer.
finish() {
	rm -rf "$CACHE/$1.new.work"
	rmdir "$CACHE/$1.new.root"
	mv "$CACHE/$1.new" "$CACHE/$1"
	echo "$2" >"$CACHE/$1.id"
}

if [ "$(cat "$CACHE/base.id" 2>/dev/null)" != "$base_id" ]; then
	rm -rf "$CACHE"/base* "$CACHE"/tools*
	started=$SECONDS
	debootstrap --variant=minbase --include=python3,python3-venv trixie "$CACHE/base.new" "$MIRROR" \
		>"$CACHE/debootstrap.log"
	"$IN_ROOT" -u "$CACHE/base.new" "${NETWORK[@]}" -- sh -euc "
		useradd --system --uid 100 --user-group --home-dir /opt/datadog-agent --shell /usr/sbin/nologin dd-agent
		python3 -m venv /opt/datadog-agent/embedded
		/opt/datadog-agent/embedded/bin/$PIP_INSTALL 'datadog-checks-base[deps]'
		mkdir -p /etc/datadog-agent/conf.d
		chown -R dd-agent:dd-agent /opt/datadog-agent /etc/datadog-agent
		apt-get clean
		rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* /usr/share/locale/*"
	finish base "$base_id"
	echo "Built the Debian 13 root in $CACHE/base ($((SECONDS - started)) s)"
fi

if [ "$(cat "$CACHE/tools.id" 2>/dev/null)" != "$tools_id" ]; then
	rm -rf "$CACHE"/tools*
	started=$SECONDS
	"$IN_ROOT" -l "$CACHE/base" -u "$CACHE/tools.new" "${NETWORK[@]}" -e DEBIAN_FRONTEND=noninteractive -- sh -euc "
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends python3-bpfcc bpftool strace iproute2 >/dev/null
		apt-get clean
		rm -rf /var/lib/apt/lists/*
		python3 -m venv --system-site-packages /opt/suite
		/opt/suite/bin/$PIP_INSTALL $SUITE_PACKAGES"
	finish tools "$tools_id"
	echo "Built its tools layer in $CACHE/tools ($((SECONDS - started)) s)"
fi
