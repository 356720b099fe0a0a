/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * What the eBPF accounting iterators write (bpf_seq_write), read by
 * datadog_checks/ebpf_probe/ebpf_stats/. Fixed-size records only.
 */
#ifndef EBPF_PROBE_EBPF_STATS_H
#define EBPF_PROBE_EBPF_STATS_H

#define STATS_COMM_LEN 16
#define STATS_NAME_LEN 16

/* iter/bpf_map: one per map, what bpf_map_info and the entry count say of it. */
struct map_record {
	__u32 id;
	__u32 type;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 flags;
	char name[STATS_NAME_LEN];
	__u64 refcnt;	/* references to the map: it changes when a holder comes or goes */
	__s64 entries;	/* bpf_map_sum_elem_count(), or NOT_COUNTED */
	__s64 ring_used;	/* a ring buffer's bytes written and not yet consumed, or NOT_COUNTED */
	__u64 memcg_id;	/* the memory cgroup charged for the map (its directory's inode), 0: none */
	__u32 map_flags;	/* MAP_* */
	__u32 _pad;
};

#define MAP_MEMCG_KNOWN 1	/* the kernel charges maps to memory cgroups (5.11+) and memcg_id was read */

/* enum bpf_map_type */
#define MAP_TYPE_RINGBUF 27
#define MAP_TYPE_USER_RINGBUF 31

#define NOT_COUNTED (-1)

/* iter/bpf_prog: one per program, what bpf_prog_info says of it, then nr_map_ids __u32 map ids. */
struct prog_record {
	__u32 id;
	__u32 type;
	__u8 tag[8];
	char name[STATS_NAME_LEN];
	__u32 insns;	/* translated instructions (8 bytes each) */
	__u32 jited_len;	/* of the main function only when func_cnt > 0 */
	__u32 func_cnt;
	__u32 pages;	/* memlock / page size */
	__u32 verified_insns;
	__u32 nr_map_ids;
	__u64 refcnt;
	__u64 run_time_ns;
	__u64 run_cnt;
	__u64 recursion_misses;
	__u32 flags;	/* PROG_* */
	__u32 _pad;
};

#define PROG_RUN_STATS 1	/* run_time_ns, run_cnt and recursion_misses were read */
#define PROG_DEVICE 2	/* offloaded or bound to a device: its JIT size is the device's */
#define PROG_MAPS_CUT 4	/* it uses more maps than MAX_MAP_IDS */
#define PROG_VERIFIED_INSNS 8	/* verified_insns was read (5.16+) */

#define MAX_MAP_IDS 64	/* the kernel's MAX_USED_MAPS */

/* iter/bpf_prog, run-time counters only (read around each statistics window). */
struct prog_run_record {
	__u32 id;
	__u32 flags;	/* PROG_RUN_STATS */
	__u64 run_time_ns;
	__u64 run_cnt;
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
	__u32 reader;	/* 1: a file of the process reading the iterator (tgid is its pid on the host) */
	char comm[STATS_COMM_LEN];
	__u64 memcg_id;	/* the process's memory cgroup (its directory's inode), 0: not known */
};

#endif /* EBPF_PROBE_EBPF_STATS_H */
