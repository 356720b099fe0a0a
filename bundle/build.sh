#!/bin/bash
# Build the libbpf.so.1 that the wheel carries: libbpf, libelf and zlib from Debian trixie's
# source packages, linked into one shared object that needs nothing but glibc 2.28 or newer and
# exports nothing but libbpf's API.
#
#   bundle/build.sh ARCH OUTPUT      ARCH: x86_64 or aarch64 (cross-built with Debian's gcc)
#
# Downloads and builds are cached in .cache/bundle (BUNDLE_CACHE): the sources once for every
# architecture, each library once per architecture, both anew when this script changes.
# Run by `make bundle`, which installs the tools.
set -euo pipefail

arch=${1:?usage: $0 x86_64|aarch64 OUTPUT}
output=${2:?usage: $0 x86_64|aarch64 OUTPUT}
here=$(cd "$(dirname "$0")" && pwd)
cache=${BUNDLE_CACHE:-$here/../.cache/bundle}
mkdir -p "$cache" && cache=$(cd "$cache" && pwd)
output=$(mkdir -p "$(dirname "$output")" && cd "$(dirname "$output")" && pwd)/$(basename "$output")

# Debian trixie's source packages (exact versions: a change of libbpf is a change of this file).
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SOURCES=(libbpf=1.5.0-3 elfutils=0.192-4 zlib=1:1.3.dfsg+really1.3.1-1)

case $arch in
x86_64 | aarch64) ;;
*) echo "unsupported architecture: $arch (x86_64, aarch64)" >&2; exit 2 ;;
esac
triplet=$arch-linux-gnu
if [ "$arch" = "$(uname -m)" ]; then
	cross= CC=${CC:-gcc} STRIP=${STRIP:-strip}
else
	cross=$triplet CC=$triplet-gcc STRIP=$triplet-strip
fi
# Position-independent code throughout: everything ends up in one shared object.
CFLAGS="-O2 -g0 -fPIC -fstack-protector-strong -D_FORTIFY_SOURCE=2"
jobs=$(nproc)
started=$(date +%s)

say() { echo "bundle: $*"; }

# A change of this script (versions, flags, steps) starts the sources and builds anew.
key=$(sha256sum "$0" | cut -c1-12)
sources=$cache/src-$key
build=$cache/build-$arch-$key

# Where `apt-get source` unpacked NAME=VERSION: NAME-UPSTREAM (no epoch, no Debian revision).
source_dir() {
	local name=${1%%=*} version=${1#*=}
	version=${version#*:}
	echo "$sources/$name-${version%-*}"
}

fetch_sources() {
	[ -f "$sources/.complete" ] && return
	say "downloading ${SOURCES[*]} (Debian trixie sources, through a private apt configuration)"
	local apt=$cache/apt
	rm -rf "$apt" "$cache"/src-* "$sources.partial"
	mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$sources.partial"
	echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR trixie main" \
		>"$apt/sources.list"
	# The machine's own sources, lists and caches are left alone.
	local opts=(-q -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
	apt-get "${opts[@]}" update >"$apt/update.log" 2>&1 || { cat "$apt/update.log" >&2; exit 1; }
	# apt checks each file against the signed index; dpkg-source unpacks it with Debian's patches.
	(cd "$sources.partial" && apt-get "${opts[@]}" source "${SOURCES[@]}") >"$apt/source.log" 2>&1 ||
		{ cat "$apt/source.log" >&2; exit 1; }
	mv "$sources.partial" "$sources"
	touch "$sources/.complete"
}

build_zlib() {
	local src=$1 b=$2/zlib
	[ -f "$b/libz.a" ] && return
	say "zlib ($arch)"
	rm -rf "$b" && cp -r "$src" "$b"
	(cd "$b" && CHOST=$cross CC=$CC CFLAGS="$CFLAGS" ./configure --static && make -j"$jobs" libz.a) \
		>"$2/zlib.log" 2>&1 || { tail -30 "$2/zlib.log" >&2; exit 1; }
}

# Only libelf (and elfutils' small lib/ it uses): no libdw, no tools, no debuginfod.
build_libelf() {
	local src=$1 b=$2/elfutils
	[ -f "$b/libelf/libelf.a" ] && return
	say "libelf ($arch)"
	rm -rf "$b" && mkdir -p "$b"
	(cd "$b" && "$src/configure" ${cross:+--host=$cross} --disable-debuginfod --disable-libdebuginfod \
		--disable-demangler --disable-nls --without-bzlib --without-lzma --without-zstd \
		CC="$CC" CFLAGS="$CFLAGS" CPPFLAGS="-I$2/zlib" LDFLAGS="-L$2/zlib" &&
		make -j"$jobs" -C lib libeu.a && make -j"$jobs" -C libelf libelf.a) \
		>"$2/elfutils.log" 2>&1 || { tail -30 "$2/elfutils.log" >&2; exit 1; }
}

# libbpf's own Makefile compiles its objects (its flags, its feature macros); the link is ours.
build_libbpf_objects() {
	local src=$1 b=$2/libbpf libelf_src=$3
	[ -f "$b/.complete" ] && return
	say "libbpf ($arch)"
	rm -rf "$b"
	local make_args=(-C "$src/src" OBJDIR="$b" CC="$CC" NO_PKG_CONFIG=1 CFLAGS="$CFLAGS -Wall -std=gnu89"
		EXTRA_CFLAGS="-I$libelf_src/libelf -I$2/zlib")
	local objects
	objects=$(make -s --no-print-directory "${make_args[@]}" --eval='bundle-objects: ; @echo $(SHARED_OBJS)' \
		bundle-objects)
	# shellcheck disable=SC2086 # one word per object
	make -j"$jobs" "${make_args[@]}" $objects >"$2/libbpf.log" 2>&1 || { tail -30 "$2/libbpf.log" >&2; exit 1; }
	touch "$b/.complete"
}

link() {
	local b=$1 libbpf_src=$2
	say "linking $output"
	"$CC" $CFLAGS -Wall -Werror -c "$here/glibc_compat.c" -o "$b/glibc_compat.o"
	# libbpf's version script exports its API (with its symbol versions) and hides the rest;
	# --exclude-libs hides libelf and zlib as well. -Bsymbolic binds libbpf's calls to itself even
	# when the host's libbpf is loaded in the same process (BCC's libbcc links it).
	"$CC" -shared -o "$output.tmp" -Wl,-soname,libbpf.so.1 \
		-Wl,--version-script="$libbpf_src/src/libbpf.map" -Wl,--exclude-libs,ALL -Wl,-Bsymbolic \
		-Wl,--no-undefined -Wl,--as-needed -Wl,-z,relro,-z,now -Wl,-z,noexecstack \
		"$b"/libbpf/sharedobjs/*.o "$b/glibc_compat.o" \
		"$b/elfutils/libelf/libelf.a" "$b/elfutils/lib/libeu.a" "$b/zlib/libz.a"
	"$STRIP" --strip-unneeded "$output.tmp"
	mv "$output.tmp" "$output"
}

fetch_sources
if [ ! -d "$build" ]; then
	rm -rf "$cache/build-$arch-"*
	mkdir -p "$build"
fi
libbpf_src=$(source_dir "${SOURCES[0]}")
elfutils_src=$(source_dir "${SOURCES[1]}")
zlib_src=$(source_dir "${SOURCES[2]}")
build_zlib "$zlib_src" "$build"
build_libelf "$elfutils_src" "$build"
build_libbpf_objects "$libbpf_src" "$build" "$elfutils_src"
link "$build" "$libbpf_src"
say "$(stat -c %s "$output") bytes in $(($(date +%s) - started)) s"
