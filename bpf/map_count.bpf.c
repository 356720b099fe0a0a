// SPDX-License-Identifier: GPL-2.0
/*
 * Fallback entry counting for kernels without bpf_map_sum_elem_count (5.13+):
 * user space points count_target at one map (bpf_map__reuse_fd), loads this
 * program and runs it once with BPF_PROG_TEST_RUN; it returns the number of
 * elements bpf_for_each_map_elem visited. One map at a time, only on that path.
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
