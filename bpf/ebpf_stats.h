/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What the eBPF accounting iterators write (bpf_seq_write), read by
 * datadog_checks/ebpf_probe/ebpf_stats.py. Fixed-size records only.
 */
#ifndef EBPF_PROBE_EBPF_STATS_H
#define EBPF_PROBE_EBPF_STATS_H

#define STATS_COMM_LEN 16

/* iter/bpf_map: one per map. */
struct map_entries_record {
	__u32 map_id;
	__u32 _pad;
	__s64 entries;	/* bpf_map_sum_elem_count(): 0 for maps that keep no count */
};

/* iter/task_file: one per file descriptor of a BPF object, in any process. */
#define OWNED_MAP 1
#define OWNED_PROG 2
#define OWNED_LINK 3

struct owner_record {
	__u32 tgid;
	__u32 fd;
	__u32 kind;	/* OWNED_* */
	__u32 id;	/* map id, program id, or link id */
	__u32 link_prog_id;	/* for a link: the program it holds */
	__u32 _pad;
	char comm[STATS_COMM_LEN];
};

#endif /* EBPF_PROBE_EBPF_STATS_H */
