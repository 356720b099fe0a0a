/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * How both variants of the OOM-kill probe fill a record, written once.
 *
 * oom_kill.bpf.c (CO-RE) and oom_kill_bcc.c (BCC) read the kernel differently
 * (BPF_CORE_READ relocations vs byte offsets resolved at run time), so each
 * defines these readers before including this file:
 *
 *   __u32 read_task_tgid(struct task_struct *), read_task_tid(...), read_task_uid(...)
 *   short read_task_oom_score_adj(...); bool read_task_sigkill_pending(...)
 *   void read_task_comm(struct task_struct *, char *buf)       (OOM_COMM_LEN)
 *   struct mm_struct *read_task_mm(...); __u64 read_mm_total_vm_pages(struct mm_struct *)
 *   long read_mm_rss_pages(struct mm_struct *, int counter); long read_mm_pgtables_bytes(...)
 *   struct kernfs_node *read_task_memcg_kn(...)   kernfs node of its memory cgroup
 *   struct kernfs_node *read_kn_parent(...); const char *read_kn_name(...); __u64 read_kn_id(...)
 *   PAGE_KB   the page size in kB
 */
#ifndef EBPF_PROBE_OOM_KILL_FILL_H
#define EBPF_PROBE_OOM_KILL_FILL_H

#include "oom_kill.h"

/* Indices of mm->rss_stat. */
#define OOM_MM_FILEPAGES 0
#define OOM_MM_ANONPAGES 1
#define OOM_MM_SHMEMPAGES 3

static __always_inline void record_init(struct oom_kill_record *r, __u8 hook)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	/* Ring buffer space is not zeroed. The arrays after the counters are
	 * read only up to their depth fields and NULs, so zero just the rest. */
	__builtin_memset(r, 0, __builtin_offsetof(struct oom_kill_record, kernel_stack));
	r->timestamp_ns = bpf_ktime_get_ns();
	r->hook = hook;
	r->trigger_pid = pid_tgid >> 32;
	r->trigger_tid = (__u32)pid_tgid;
	bpf_get_current_comm(r->trigger_comm, sizeof(r->trigger_comm));
}

static __always_inline __u64 positive(long value)
{
	/* Per-CPU deltas not yet folded in can leave a shared count negative. */
	return value > 0 ? value : 0;
}

static __always_inline void fill_memory(struct oom_kill_record *r, struct task_struct *task)
{
	struct mm_struct *mm = read_task_mm(task);

	if (!mm)
		return;
	r->total_vm_kb = read_mm_total_vm_pages(mm) * PAGE_KB;
	r->anon_rss_kb = positive(read_mm_rss_pages(mm, OOM_MM_ANONPAGES)) * PAGE_KB;
	r->file_rss_kb = positive(read_mm_rss_pages(mm, OOM_MM_FILEPAGES)) * PAGE_KB;
	r->shmem_rss_kb = positive(read_mm_rss_pages(mm, OOM_MM_SHMEMPAGES)) * PAGE_KB;
	r->pgtables_kb = positive(read_mm_pgtables_bytes(mm)) >> 10;
	r->flags |= OOM_F_MEMORY;
}

/* Copy a cgroup level's name; the helper's length counts the NUL, so a full
 * buffer may still hold the whole name: the next byte tells. */
static __always_inline void copy_cgroup_name(struct oom_kill_record *r, int level, const char *name)
{
	char next = 0;

	if (bpf_probe_read_kernel_str(r->cgroup_names[level], OOM_CGROUP_NAME_LEN, name) < OOM_CGROUP_NAME_LEN)
		return;
	bpf_probe_read_kernel(&next, 1, name + OOM_CGROUP_NAME_LEN - 1);
	if (next)
		r->flags |= OOM_F_CGROUP_NAME_TRUNCATED;
}

/* The victim's memory cgroup path, leaf first, read now: it may be gone soon. */
static __always_inline void fill_cgroup(struct oom_kill_record *r, struct task_struct *task)
{
	struct kernfs_node *kn = read_task_memcg_kn(task);
	int i;

	if (!kn)
		return;
	r->cgroup_id = read_kn_id(kn);
	r->flags |= OOM_F_CGROUP;
#pragma unroll
	for (i = 0; i < OOM_CGROUP_MAX_DEPTH; i++) {
		struct kernfs_node *parent = read_kn_parent(kn);

		if (!parent)	/* the hierarchy's root has no name in the path */
			return;
		copy_cgroup_name(r, i, read_kn_name(kn));
		r->cgroup_depth = i + 1;
		kn = parent;
	}
	if (read_kn_parent(kn))
		r->flags |= OOM_F_CGROUP_DEPTH_TRUNCATED;
}

static __always_inline void fill_victim(struct oom_kill_record *r, struct task_struct *task)
{
	r->victim_pid = read_task_tgid(task);
	r->victim_tid = read_task_tid(task);
	r->victim_uid = read_task_uid(task);
	r->oom_score_adj = read_task_oom_score_adj(task);
	read_task_comm(task, r->victim_comm);
	r->flags |= OOM_F_VICTIM_TASK;
	if (read_task_sigkill_pending(task))
		r->flags |= OOM_F_SIGKILL;
	fill_memory(r, task);
	fill_cgroup(r, task);
}

/* The classic tracepoint names only the marked thread. Its process is known
 * when that thread is the trigger or the trigger's main thread (a process
 * killed for its own allocation); otherwise only the thread id is. */
static __always_inline void set_victim_thread(struct oom_kill_record *r, __u32 tid)
{
	r->victim_tid = tid;
	if (tid == r->trigger_tid || tid == r->trigger_pid)
		r->victim_pid = r->trigger_pid;
	else
		r->flags |= OOM_F_VICTIM_PID_UNKNOWN;
}

static __always_inline void set_oom_control(struct oom_kill_record *r, __u64 domain_pages, __s64 badness,
					    bool memcg)
{
	r->oom_domain_pages = domain_pages;
	r->badness_points = badness;
	r->flags |= OOM_F_OOM_CONTROL | OOM_F_CONSTRAINT_KNOWN;
	if (memcg)
		r->flags |= OOM_F_MEMCG;
}

#endif /* EBPF_PROBE_OOM_KILL_FILL_H */
