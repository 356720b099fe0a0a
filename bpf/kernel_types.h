/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel types the CO-RE programs read, and only the fields they read.
 *
 * Instead of a 3 MB vmlinux.h from one kernel, each type is declared with
 * preserve_access_index: clang records every field access as a BTF
 * relocation and libbpf rewrites the offsets at load time against the
 * running kernel's BTF. Field order and padding here are irrelevant; names
 * and kinds must match the kernel's. Names ending in ___suffix are libbpf
 * "flavors": alternative shapes of the same kernel type on other versions.
 */
#ifndef EBPF_PROBE_KERNEL_TYPES_H
#define EBPF_PROBE_KERNEL_TYPES_H
/* This header stands in for vmlinux.h: tell bpf_tracing.h to use the
 * kernel's register names (pt_regs->di, not the user-space ->rdi). */
#define __VMLINUX_H__

#include <linux/types.h>
#include <linux/bpf.h>

typedef __s8 s8;
typedef __u8 u8;
typedef __s16 s16;
typedef __u16 u16;
typedef __s32 s32;
typedef __u32 u32;
typedef __s64 s64;
typedef __u64 u64;
typedef __u32 uid_t;
typedef _Bool bool;
#define true 1
#define false 0

#define PA __attribute__((preserve_access_index))

typedef struct {
	long counter;
} PA atomic_long_t;

typedef struct {
	uid_t val;
} PA kuid_t;

struct cred {
	kuid_t uid;
} PA;

/* 6.2+: one percpu_counter per MM counter. */
struct percpu_counter {
	s64 count;
} PA;

struct mm_struct {
	unsigned long total_vm;
	atomic_long_t pgtables_bytes;
	struct percpu_counter rss_stat[4];
} PA;

/* Before 6.2: an array of atomics. */
struct mm_rss_stat {
	atomic_long_t count[4];
} PA;

struct mm_struct___atomic_rss {
	struct mm_rss_stat rss_stat;
} PA;

typedef struct {
	unsigned long sig[1];
} PA sigset_t;

struct sigpending {
	sigset_t signal;
} PA;

struct signal_struct {
	short oom_score_adj;
	struct sigpending shared_pending;
} PA;

struct kernfs_node {
	struct kernfs_node *parent;
	const char *name;
	u64 id;
} PA;

/* 6.15+: parent is RCU-protected and renamed. */
struct kernfs_node___rcu_parent {
	struct kernfs_node *__parent;
} PA;

/* Pressure stall averages, avg[NR_PSI_STATES - 1][3] in the source, one row of three (10 s, 60 s,
 * 300 s) per state; BTF keeps it flat. FIXED_1 (2048) = 100%. */
struct psi_group {
	unsigned long avg[18];
} PA;

enum psi_states {
	PSI_IO_SOME,
	PSI_IO_FULL,
	PSI_MEM_SOME,
	PSI_MEM_FULL,
};

struct cgroup {
	int level;	/* depth below the hierarchy's root */
	struct kernfs_node *kn;
	struct psi_group *psi;	/* 6.1+ */
} PA;

/* Before 6.1: the pressure group is in the cgroup. */
struct cgroup___psi_embedded {
	struct psi_group psi;
} PA;

struct cgroup_subsys_state {
	struct cgroup *cgroup;
	struct cgroup_subsys_state *parent;
} PA;

struct page_counter {
	atomic_long_t usage;	/* pages */
	unsigned long max;
} PA;

/* memory.events, in the order the file shows them (oom_group_kill from 5.17). */
enum memcg_memory_event {
	MEMCG_LOW,
	MEMCG_HIGH,
	MEMCG_MAX,
	MEMCG_OOM,
	MEMCG_OOM_KILL,
	MEMCG_OOM_GROUP_KILL,
};

struct mem_cgroup {
	struct cgroup_subsys_state css;
	struct page_counter memory;
	bool oom_group;	/* memory.oom.group (cgroup v2) */
	atomic_long_t memory_events[9];	/* what memory.events shows (hierarchical) */
} PA;

struct upid {
	int nr;
} PA;

/* A process id in each pid namespace it is seen from: numbers[level] is its own namespace's. */
struct pid {
	unsigned int level;
	struct upid numbers[1];
} PA;

struct css_set {
	struct cgroup_subsys_state *subsys[0];
} PA;

enum cgroup_subsys_id {
	memory_cgrp_id = 4,
};

struct list_head {
	struct list_head *next;
	struct list_head *prev;
};

struct task_struct {
	int pid;
	int tgid;
	char comm[16];
	struct mm_struct *mm;
	struct signal_struct *signal;
	const struct cred *real_cred;
	struct css_set *cgroups;
	struct task_struct *group_leader;
	u64 start_time;	/* ns since boot */
	u64 start_boottime;	/* the same, counting suspend: what /proc/PID/stat's starttime shows */
	struct pid *thread_pid;
	struct task_struct *real_parent;	/* the reaper once its parent has exited */
	struct list_head children;	/* oldest first: forks and adopted orphans are added at the tail */
	struct list_head sibling;	/* its place in its parent's children */
} PA;

/* signal_generate's siginfo, used through its pointer only. */
struct kernel_siginfo;

struct oom_control {
	struct mem_cgroup *memcg;
	unsigned long totalpages;
	struct task_struct *chosen;
	long chosen_points;
} PA;

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

/* tracepoint/oom/mark_victim; every field but pid is from ~6.9 on. */
struct trace_event_raw_mark_victim {
	struct trace_entry ent;
	int pid;
	u32 __data_loc_comm;
	unsigned long total_vm;
	unsigned long anon_rss;
	unsigned long file_rss;
	unsigned long shmem_rss;
	uid_t uid;
	unsigned long pgtables;
	short oom_score_adj;
} PA;

/* eBPF accounting: BPF iterators over maps and over every task's files. */
struct seq_file;

struct bpf_iter_meta {
	struct seq_file *seq;
	u64 session_id;
	u64 seq_num;
} PA;

typedef struct {
	s64 counter;
} PA atomic64_t;

struct bpf_map {
	u32 id;
	enum bpf_map_type map_type;
	u32 key_size;
	u32 value_size;
	u32 max_entries;
	u32 map_flags;
	char name[16];
	atomic64_t refcnt;	/* every reference: fds, pins, programs, links */
	struct obj_cgroup *objcg;	/* 6.1+ */
} PA;

struct bpf_prog_aux {
	atomic64_t refcnt;
	u32 id;
	u32 used_map_cnt;
	u32 func_cnt;	/* subprograms, each JIT-compiled on its own */
	u32 verified_insns;	/* 5.16+ */
	bool dev_bound;	/* 6.3+ */
	void *offload;
	struct bpf_map **used_maps;
	char name[16];
} PA;

/* u64_stats_t: a counter that is one 64-bit word on 64-bit CPUs. */
struct bpf_prog_stats {
	struct {
		long v;
	} cnt;
	struct {
		long v;
	} nsecs;
	struct {
		long v;
	} misses;	/* 5.12+ */
} PA;

struct bpf_prog {
	u32 pages;	/* memlock, in pages (u16 on recent kernels: loads are resized) */
	enum bpf_prog_type type;
	u32 len;	/* translated instructions */
	u32 jited_len;
	u8 tag[8];
	struct bpf_prog_stats *stats;	/* per CPU (5.11+; in aux before) */
	struct bpf_prog_aux *aux;
} PA;

/* A per-CPU array: pptrs[i] is element i's per-CPU address, before a CPU's offset is added. */
struct bpf_array {
	void *pptrs[0];
} PA;

struct bpf_link {
	u32 id;
	struct bpf_prog *prog;
} PA;

struct qstr {
	const unsigned char *name;
} PA;

struct dentry {
	struct qstr d_name;
} PA;

struct path {
	struct dentry *dentry;
} PA;

struct file {
	struct path f_path;
	void *private_data;
} PA;

struct bpf_iter__bpf_map {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
} PA;

struct bpf_iter__bpf_prog {
	struct bpf_iter_meta *meta;
	struct bpf_prog *prog;
} PA;

struct bpf_iter__bpf_map_elem {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
	void *key;
	void *value;
} PA;

struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	u32 fd;
	struct file *file;
} PA;

/* Present only on kernels with BPF ring buffers (5.8+). The positions are byte counts that only
 * grow: what is written and not yet consumed is producer_pos - consumer_pos. */
struct bpf_ringbuf {
	u64 mask;
	unsigned long consumer_pos;
	unsigned long producer_pos;
} PA;

/* A BPF_MAP_TYPE_RINGBUF or USER_RINGBUF map: the map, and its buffer. */
struct bpf_ringbuf_map {
	struct bpf_map map;
	struct bpf_ringbuf *rb;
} PA;

/* What a map's memory is charged to: its creator's memory cgroup, through an object cgroup from 6.1,
 * directly on 5.11 to 6.0 (CONFIG_MEMCG_KMEM). */
struct obj_cgroup {
	struct mem_cgroup *memcg;
} PA;

struct bpf_map___memcg {
	struct mem_cgroup *memcg;
} PA;

/* Registers, for BPF_KPROBE's argument access (bpf_tracing.h picks the names
 * by __TARGET_ARCH_*). Only the uapi layout matters: no relocation. */
#if defined(__TARGET_ARCH_x86)
struct pt_regs {
	unsigned long r15;
	unsigned long r14;
	unsigned long r13;
	unsigned long r12;
	unsigned long bp;
	unsigned long bx;
	unsigned long r11;
	unsigned long r10;
	unsigned long r9;
	unsigned long r8;
	unsigned long ax;
	unsigned long cx;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
	unsigned long ip;
	unsigned long cs;
	unsigned long flags;
	unsigned long sp;
	unsigned long ss;
};
#elif defined(__TARGET_ARCH_arm64)
/* bpf_tracing.h reads arm64 registers through user_pt_regs, the start of pt_regs. */
struct user_pt_regs {
	u64 regs[31];
	u64 sp;
	u64 pc;
	u64 pstate;
};
struct pt_regs {
	struct user_pt_regs user_regs;
};
#else
#error "kernel_types.h: set __TARGET_ARCH_x86 or __TARGET_ARCH_arm64"
#endif

#undef PA

#endif /* EBPF_PROBE_KERNEL_TYPES_H */
