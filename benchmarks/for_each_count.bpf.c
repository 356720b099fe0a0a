// SPDX-License-Identifier: GPL-2.0
/*
 * The peers' way of counting a map's entries (Datadog's ebpf check), for the
 * benchmark only: count_target is pointed at one map (bpf_map__reuse_fd), the
 * program loaded, and run once with BPF_PROG_TEST_RUN; it returns the number
 * of elements bpf_for_each_map_elem visited. One load per map.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} count_target SEC(".maps");

static long count_element(void *map, void *key, void *value, void *ctx)
{
	return 0;	/* 0: go on to the next element */
}

SEC("raw_tp")
int count_with_for_each(void *ctx)
{
	return bpf_for_each_map_elem(&count_target, count_element, NULL, 0);
}
