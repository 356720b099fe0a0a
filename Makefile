# ebpf_probe: `make run` and `make test` set up everything they need on Debian 12 (as root).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Debian's python3 is the one python3-bpfcc (BCC) is built for.
SYSTEM_PYTHON := /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU the BPF objects are for (only kprobe register access differs): x86 or arm64,
# the build machine's by default. `make bpf ARCH=arm64` builds arm64 objects under build/bpf/arm64.
HOST_ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
ARCH ?= $(HOST_ARCH)
# The same CPU as uname -m and the C compilers name it.
MACHINE := $(if $(filter arm64,$(ARCH)),aarch64,x86_64)
HOST_MACHINE := $(shell uname -m)
ifeq ($(ARCH),$(HOST_ARCH))
BPF_OUT ?= datadog_checks/ebpf_probe/data/bpf
else
BPF_OUT ?= build/bpf/$(ARCH)
endif
CORE_OBJECTS := $(BPF_OUT)/oom_kill.bpf.o $(BPF_OUT)/ebpf_stats.bpf.o $(BPF_OUT)/map_count.bpf.o
MULTIARCH := $(shell dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo $$(uname -m)-linux-gnu)
CLANG ?= clang
LLVM_STRIP ?= llvm-strip
# The build machine's asm/types.h serves any target: it only includes asm-generic's, the same for both.
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -I/usr/include/$(MULTIARCH) -Ibpf

# What the check needs at run time, and what building and testing it needs.
RUNTIME_PACKAGES := libbpf1 python3-venv python3-bpfcc bpftool
BUILD_PACKAGES := clang llvm libbpf-dev linux-libc-dev
# Kernel headers for BCC's runtime compilation in tests (this machine's kernel has none of its own).
# debootstrap makes the Debian 13 root of the Agent-like runtime tests (tests/agent).
TEST_PACKAGES := linux-headers-amd64 strace util-linux debootstrap tini dumb-init catatonit
DEBIAN_PACKAGES := $(RUNTIME_PACKAGES) $(BUILD_PACKAGES) $(TEST_PACKAGES)
PIP_PACKAGES := datadog-checks-base[deps] datadog-checks-dev pytest hypothesis markdown-it-py ruff mypy build auditwheel
# What the suite needs under Python 3.13 in the Debian 13 root (hatchling: the editable install there).
SUITE_PIP_PACKAGES := datadog-checks-base[deps] datadog-checks-dev pytest hypothesis hatchling

# A folder joining Debian's split kernel headers (-common and -amd64), handed to BCC with
# BCC_KERNEL_SOURCE by the tests: a test fixture that leaves /lib/modules alone.
KERNEL_HEADERS := .cache/kernel-headers

.PHONY: help run test test-kernels bench bpf deps venv lint ddev ddev-test format kernel-headers clean bundle \
	bundle-bpf bundle-other-arch wheel agent-root test-agent test-py313

help:
	@echo "make run   - set up everything, build the BPF objects, run the check once and print what it submits"
	@echo "make test  - set up everything and run the whole test suite (as root: it loads BPF programs)"
	@echo "make test-agent - the check as the Agent runs it: Python 3.13, no libbpf, no BCC (a Debian 13 root)"
	@echo "make test-py313 - the suite under Python 3.13 in that root (all but the build, agent and VM-only tests)"
	@echo "make test-kernels [KERNELS=\"5.10 6.12\"] [VM_PYTEST='pytest args'] - the tests inside VMs booting other kernels (tests/vm/kernels.py)"
	@echo "make bpf   - build the CO-RE objects only"
	@echo "make bundle - build the libbpf.so.1 the wheel carries (ARCH=arm64: cross-build it)"
	@echo "make wheel - build the wheel into dist/ and show auditwheel's verdict (ARCH=arm64 too)"
	@echo "make bench - measure start-up, scale, run cost, OOM bursts and memory against the goals"
	@echo "make lint  - ruff, mypy and ddev's validations"
	@echo "make ddev-test - the suite and the lint through ddev"

run: deps venv bpf bundle
	$(BIN)/ebpf-probe check

# On this machine (Python 3.11), with the Agent-like runtime tests (tests/agent) among them; then the
# suite under Python 3.13 in the Debian 13 root; then, with qemu, on the kernels of the matrix.
test: deps venv bpf bundle bundle-other-arch kernel-headers agent-root lint
	BCC_TEST_KERNEL_SOURCE=$(CURDIR)/$(KERNEL_HEADERS) $(BIN)/pytest -ra tests
	$(MAKE) --no-print-directory test-py313
	@if command -v qemu-system-x86_64 >/dev/null; then $(MAKE) --no-print-directory test-kernels; \
	else echo "qemu-system-x86_64 is not installed: the kernel matrix (make test-kernels) did not run"; fi

# The kernel matrix (tests/vm/README.md): each row of tests/vm/kernels.py boots its Debian kernel under
# qemu with a Debian 12 root in RAM and runs this checkout's tests there with pytest, against the wheel
# built from the checkout. KERNELS picks rows (default: all), VM_PYTEST replaces every row's pytest
# arguments. Kernels, roots and layers are cached in .cache/vm (built on first use: a few minutes).
# The arm64 root's maintainer scripts run under qemu-user (binfmt_misc).
VM_PACKAGES := qemu-system-x86 qemu-system-arm qemu-user-static binfmt-support mmdebstrap arch-test cpio
KERNELS ?=
VM_PYTEST ?=
export KERNELS VM_PYTEST
test-kernels: deps venv bpf bundle bundle-other-arch
	@test -e /proc/sys/fs/binfmt_misc/status || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || \
		echo "cannot mount binfmt_misc: the arm64 row will say why it cannot run"
	$(call install_missing,$(VM_PACKAGES))
	@test -e /proc/sys/fs/binfmt_misc/qemu-aarch64 || update-binfmts --enable qemu-aarch64 || true
	$(BIN)/pytest -p no:cacheprovider -ra -s -m vm tests/vm/test_kernels.py

# --- The Agent-like runtime: a Debian 13 root (tests/agent) -------------------------------------------
# debootstrap's minbase with Python 3.13 and an Agent-like venv (base), and a layer with BCC, bpftool
# and the suite's dependencies (tools), cached in .cache/trixie (about a minute the first time).
AGENT_ROOT := .cache/trixie
agent-root: | deps
	SUITE_PACKAGES='$(SUITE_PIP_PACKAGES)' bash tests/agent/build_root.sh

# The check installed as the Agent installs it and run in the root (as root, as uid 100 with
# capabilities, the BCC fallback with and without BCC); also part of `make test`'s first run.
test-agent: venv bpf bundle kernel-headers agent-root
	BCC_TEST_KERNEL_SOURCE=$(CURDIR)/$(KERNEL_HEADERS) $(BIN)/pytest -ra -m agent tests/agent

# The suite under the root's Python 3.13, the checkout bound at /src (installed there in editable
# mode): every test but those that build the package with this machine's tools (build), drive the
# root from outside (agent), boot a VM (vm) or need what only a VM row has (pyproject.toml's addopts).
# BCC tests use Debian 13's BCC and Debian 12's headers.
PY313_MARKERS := not build and not agent and not vm and not cgroup_v2 and not system_oom and not container_runtime \
	and not kernel_headers and not minimal_init and not memory_killer
test-py313: venv bpf bundle kernel-headers agent-root
	@scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	tests/agent/in_root.sh -l $(AGENT_ROOT)/base -l $(AGENT_ROOT)/tools -u "$$scratch/upper" \
		-b $(CURDIR):/src -b /usr/src:/usr/src:ro -b $(CURDIR)/$(KERNEL_HEADERS):/kernel-headers:ro \
		-e BCC_TEST_KERNEL_SOURCE=/kernel-headers -e PYTHONDONTWRITEBYTECODE=1 -- sh -euc \
		'cd /src && /opt/suite/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . && \
		exec /opt/suite/bin/python -m pytest -ra -p no:cacheprovider -m "$(PY313_MARKERS)" tests'

bpf: $(CORE_OBJECTS)

$(BPF_OUT)/%.bpf.o: bpf/%.bpf.c bpf/kernel_types.h $(wildcard bpf/*.h) | deps
	@mkdir -p $(BPF_OUT)
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@
	$(LLVM_STRIP) -g $@  # drop DWARF, keep the BTF that CO-RE needs

# Install the Debian packages that are missing (apt-get update only when something is).
# Install those of the Debian packages $(1) that are missing (apt-get update only when some are).
define install_missing
	@missing=$$(for p in $(1); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps: .cache/deps.stamp
.cache/deps.stamp: Makefile
	$(call install_missing,$(DEBIAN_PACKAGES))
	@mkdir -p .cache && touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml Makefile | deps
	test -x $(BIN)/python || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PIP_PACKAGES)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	@touch $@

kernel-headers: $(KERNEL_HEADERS)/.joined
$(KERNEL_HEADERS)/.joined: | deps
	rm -rf $(KERNEL_HEADERS) && mkdir -p $(KERNEL_HEADERS)
	common=$$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1); \
	arch=$${common%-common}-amd64; \
	cp -rs $$common/. $(KERNEL_HEADERS)/ && cp -rs --remove-destination $$arch/. $(KERNEL_HEADERS)/
	@touch $@

# ddev (Datadog's integration tooling) in a venv of its own; 14.4 is its last release for Python 3.11.
DDEV_VENV := .cache/ddev
DDEV := $(CURDIR)/$(DDEV_VENV)/bin/ddev
DDEV_VALIDATIONS := config models metadata service-checks readmes package imports dashboards

ddev: $(DDEV_VENV)/.installed
$(DDEV_VENV)/.installed: | deps
	test -x $(DDEV_VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(DDEV_VENV)
	$(DDEV_VENV)/bin/pip install -q --disable-pip-version-check "ddev==14.4.0"
	@touch $@

# ddev wants the integration as a folder of a git repository: a throwaway workspace holding a
# link named after the package to this checkout (the project itself stays where it is).
lint: venv ddev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@workspace=$$(mktemp -d) && trap 'rm -rf "$$workspace"' EXIT && git -C "$$workspace" init -q && \
	ln -s $(CURDIR) "$$workspace/ebpf_probe" && cd "$$workspace" && \
	for validation in $(DDEV_VALIDATIONS); do \
		echo "ddev -x validate $$validation ebpf_probe"; \
		output=$$($(DDEV) -x validate $$validation ebpf_probe 2>&1); status=$$?; \
		echo "$$output" | grep -v 'upgrade to version'; \
		test $$status -eq 0 || exit 1; \
	done

# The suite in ddev's own environment, and ddev's lint, as integrations-core's CI runs them.
ddev-test: venv ddev bpf bundle kernel-headers agent-root
	BCC_TEST_KERNEL_SOURCE=$(CURDIR)/$(KERNEL_HEADERS) $(DDEV) -x test .
	$(DDEV) -x test --lint .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(BPF_OUT)/*.bpf.o $(BUNDLED_LIBBPF) build dist .pytest_cache .ruff_cache

# Performance against the goals and the peers (as root, ~5 minutes): a markdown table and JSON.
bench: deps venv bpf bundle kernel-headers
	$(BIN)/python -m benchmarks.run

# --- Bundled libbpf -------------------------------------------------------------------------------
# The wheel carries its own libbpf.so.1: libbpf 1.5.0 with libelf and zlib linked in, built from
# Debian trixie's source packages by bundle/build.sh, needing only glibc >= 2.28 (the Agent's image
# and many hosts have no libbpf.so.1). Sources and builds are cached in .cache/bundle (~20 s the
# first time). The package loads it from data/lib; ARCH=arm64 cross-builds one for `make wheel`.
BUNDLE_LIB := .cache/bundle/$(MACHINE)/libbpf.so.1
BUNDLED_LIBBPF := datadog_checks/ebpf_probe/data/lib/libbpf.so.1
BUNDLE_PACKAGES := gcc libc6-dev make dpkg-dev debian-archive-keyring bzip2 xz-utils
CROSS_PACKAGES_aarch64 := gcc-aarch64-linux-gnu libc6-dev-arm64-cross
CROSS_PACKAGES_x86_64 := gcc-x86-64-linux-gnu libc6-dev-amd64-cross

bundle: $(BUNDLED_LIBBPF) $(BUNDLE_LIB)

$(BUNDLED_LIBBPF): .cache/bundle/$(HOST_MACHINE)/libbpf.so.1
	install -D -m 0755 $< $@

.cache/bundle/%/libbpf.so.1: bundle/build.sh bundle/glibc_compat.c
	$(call install_missing,$(BUNDLE_PACKAGES) $(if $(filter $*,$(HOST_MACHINE)),,$(CROSS_PACKAGES_$*)))
	bash bundle/build.sh $* $@

# The library and the CO-RE objects for ARCH (the kprobe reads the registers of its CPU).
bundle-bpf: bundle bpf

# A wheel for ARCH in dist/, tagged manylinux_2_28 by hatch_build.py, and auditwheel's verdict.
wheel: bundle-bpf venv
	rm -f dist/datadog_ebpf_probe-*_$(MACHINE).whl
	EBPF_PROBE_LIBBPF=$(CURDIR)/$(BUNDLE_LIB) EBPF_PROBE_BPF_DIR=$(abspath $(BPF_OUT)) \
		$(BIN)/python -m build --wheel --outdir dist .
	$(BIN)/auditwheel show dist/datadog_ebpf_probe-*_$(MACHINE).whl

# `make test` checks the other architecture's build too (arm64 on x86-64; tests/test_bundle.py):
# its glibc floor, exports and wheel, and a smoke test of the library under qemu-user.
OTHER_ARCH := $(if $(filter x86,$(HOST_ARCH)),arm64,x86)
bundle-other-arch:
	$(MAKE) --no-print-directory bundle-bpf ARCH=$(OTHER_ARCH)
	$(call install_missing,qemu-user)
