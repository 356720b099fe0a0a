#!/bin/bash
# Run a command as root in the tests' Debian 13 root (tests/agent/build_root.sh), with chroot, in a
# mount namespace of its own: nothing it mounts is seen outside, and all of it is gone when it ends.
#
#   in_root.sh [-l LAYER]... -u UPPER [-b SRC:DST[:ro]]... [-e NAME=VALUE]... -- COMMAND [ARG]...
#
#   -l LAYER        a layer of the root, lowest first: mounted read-only under an overlay
#   -u UPPER        where the run's writes go (the overlay's upper folder; a later run with the same
#                   UPPER sees them). Without -l, UPPER is itself the root, written to directly.
#   -b SRC:DST      bind SRC of this machine at DST in the root (:ro to make it read-only)
#   -e NAME=VALUE   an environment variable of COMMAND, which otherwise gets only PATH, HOME and LANG
#
# The root sees this machine's kernel interfaces as a privileged container of the Agent does:
# /dev, /proc (this PID namespace: host pids, like hostPID) and /sys (with /sys/kernel/btf, the
# cgroup hierarchies and, where mounted, tracefs and bpffs).
set -euo pipefail

usage() {
	sed -n '5,12s/^# \{0,1\}//p' "$0" >&2
	exit 2
}

arguments=("$@")
layers=() binds=() variables=() upper=
while getopts 'l:u:b:e:' option; do
	case $option in
	l) layers+=("$(realpath -e "$OPTARG")") ;;
	u) upper=$OPTARG ;;
	b) binds+=("$OPTARG") ;;
	e) variables+=("$OPTARG") ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
if [ -z "$upper" ] || [ $# -eq 0 ]; then
	usage
fi

if [ "${IN_ROOT_NAMESPACE:-}" != 1 ]; then
	exec unshare --mount --propagation private -- env IN_ROOT_NAMESPACE=1 "$0" "${arguments[@]}"
fi

mkdir -p "$upper"
upper=$(realpath -e "$upper")
root=$upper.root
mkdir -p "$root"
if [ ${#layers[@]} -eq 0 ]; then
	mount --bind "$upper" "$root"
else
	lower=
	for layer in "${layers[@]}"; do
		lower=$layer${lower:+:$lower} # overlayfs lists the topmost layer first
	done
	mkdir -p "$upper.work"
	mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$upper.work" "$root"
fi
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
for bind in "${binds[@]}"; do
	source=${bind%%:*}
	target=${bind#*:}
	mode=
	if [ "${target%:ro}" != "$target" ]; then
		target=${target%:ro} mode=ro
	fi
	if [ -d "$source" ]; then
		mkdir -p "$root$target"
	else
		mkdir -p "$(dirname "$root$target")"
		[ -e "$root$target" ] || touch "$root$target"
	fi
	mount --bind "$source" "$root$target"
	if [ -n "$mode" ]; then
		mount -o remount,bind,ro "$root$target"
	fi
done
exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	HOME=/root LANG=C.UTF-8 "${variables[@]}" "$@"
