// SPDX-License-Identifier: GPL-2.0
/*
 * Entry counting for kernels without bpf_map_sum_elem_count (5.13 to 6.5):
 * user space puts the map to count in slot 0 of count_target, runs this
 * program once with BPF_PROG_TEST_RUN, and takes the slot back. It returns
 * the number of elements bpf_for_each_map_elem visited.
 *
 * The verifier checks the program against count_target's inner map template,
 * which user space sets to the first map of a shape (type, key and value
 * sizes, flags): one load serves every later map of that shape.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define NO_MAP 0xffffffff

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
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
	__u32 zero = 0;
	void *map = bpf_map_lookup_elem(&count_target, &zero);

	if (!map)
		return NO_MAP;
	return bpf_for_each_map_elem(map, count_element, NULL, 0);
}
