// SPDX-License-Identifier: GPL-2.0
/*
 * OOM-kill probe, runtime-compiled variant: BCC compiles this text on the
 * host when the CO-RE object cannot be loaded. Same record, same hooks as
 * oom_kill.bpf.c; user space defines which hooks to build:
 *   HOOK_RAW_TP     raw_tracepoint/mark_victim, task argument (~6.9+)
 *   HOOK_KPROBE     kprobe/oom_kill_process; KPROBE_WRITES_RECORDS unless
 *                   HOOK_RAW_TP is built too
 *   HOOK_TRACEPOINT tracepoint oom:mark_victim; MARK_VICTIM_HAS_MM when its
 *                   format has the memory fields (~6.9+)
 *   USE_RINGBUF     ring buffer of RINGBUF_PAGES pages, else a perf buffer
 *
 * Kernel structs are read at byte offsets given as OFF_* macros. User space
 * resolves them from the running kernel's BTF when it has one; otherwise it
 * defines OFFSETS_FROM_HEADERS and they come from the kernel headers BCC
 * compiles with, which must then be the running kernel's own.
 */
#include <uapi/linux/ptrace.h>
#include <uapi/linux/bpf.h>
#include "oom_kill.h"

#ifdef OFFSETS_FROM_HEADERS
#include <linux/version.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/cred.h>
#include <linux/mm_types.h>
#include <linux/cgroup-defs.h>
#include <linux/kernfs.h>
#include <linux/oom.h>
#define OFF_TASK_PID offsetof(struct task_struct, pid)
#define OFF_TASK_TGID offsetof(struct task_struct, tgid)
#define OFF_TASK_COMM offsetof(struct task_struct, comm)
#define OFF_TASK_MM offsetof(struct task_struct, mm)
#define OFF_TASK_SIGNAL offsetof(struct task_struct, signal)
#define OFF_TASK_REAL_CRED offsetof(struct task_struct, real_cred)
#define OFF_TASK_CGROUPS offsetof(struct task_struct, cgroups)
#define OFF_SIGNAL_OOM_SCORE_ADJ offsetof(struct signal_struct, oom_score_adj)
#define OFF_SIGNAL_PENDING offsetof(struct signal_struct, shared_pending.signal)
#define OFF_CRED_UID offsetof(struct cred, uid)
#define OFF_MM_TOTAL_VM offsetof(struct mm_struct, total_vm)
#define OFF_MM_PGTABLES offsetof(struct mm_struct, pgtables_bytes)
#define OFF_MM_RSS_STAT offsetof(struct mm_struct, rss_stat)
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
#define RSS_STAT_STRIDE sizeof(struct percpu_counter)
#define OFF_RSS_COUNT offsetof(struct percpu_counter, count)
#else
#define RSS_STAT_STRIDE sizeof(atomic_long_t)
#define OFF_RSS_COUNT 0
#endif
#define OFF_CSS_SET_SUBSYS offsetof(struct css_set, subsys)
#define MEMORY_CGRP_ID memory_cgrp_id
#define OFF_CSS_CGROUP offsetof(struct cgroup_subsys_state, cgroup)
#define OFF_CGROUP_KN offsetof(struct cgroup, kn)
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 15, 0)
#define OFF_KN_PARENT offsetof(struct kernfs_node, __parent)
#else
#define OFF_KN_PARENT offsetof(struct kernfs_node, parent)
#endif
#define OFF_KN_NAME offsetof(struct kernfs_node, name)
#define OFF_KN_ID offsetof(struct kernfs_node, id)
#define OFF_OC_MEMCG offsetof(struct oom_control, memcg)
#define OFF_OC_TOTALPAGES offsetof(struct oom_control, totalpages)
#define OFF_OC_CHOSEN offsetof(struct oom_control, chosen)
#define OFF_OC_CHOSEN_POINTS offsetof(struct oom_control, chosen_points)
#endif /* OFFSETS_FROM_HEADERS */

#define SIGKILL_BIT (1UL << (9 - 1))

#define READ_AT(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(heap, struct oom_kill_record, 1);
#endif
BPF_ARRAY(dropped_kills, u64, 1);
#if defined(HOOK_KPROBE) && !defined(KPROBE_WRITES_RECORDS)
BPF_TABLE("lru_hash", u32, struct oom_control_info, oom_controls, 256);
#endif

static inline void count_drop(void)
{
	int zero = 0;
	u64 *dropped = dropped_kills.lookup(&zero);

	if (dropped)
		__sync_fetch_and_add(dropped, 1);
}

static inline struct oom_kill_record *record_reserve(void)
{
	struct oom_kill_record *r;
#ifdef USE_RINGBUF
	r = events.ringbuf_reserve(sizeof(struct oom_kill_record));
#else
	int zero = 0;

	r = heap.lookup(&zero);
#endif
	if (!r)
		count_drop();
	return r;
}

static inline void record_submit(void *ctx, struct oom_kill_record *r)
{
#ifdef USE_RINGBUF
	events.ringbuf_submit(r, 0);
#else
	if (events.perf_submit(ctx, r, sizeof(*r)))
		count_drop();
#endif
}

static inline void record_init(void *ctx, struct oom_kill_record *r, u8 hook)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	long size;

	__builtin_memset(r, 0, offsetof(struct oom_kill_record, kernel_stack));
	r->timestamp_ns = bpf_ktime_get_ns();
	r->hook = hook;
	r->trigger_pid = pid_tgid >> 32;
	r->trigger_tid = (u32)pid_tgid;
	bpf_get_current_comm(r->trigger_comm, sizeof(r->trigger_comm));
	size = bpf_get_stack(ctx, r->kernel_stack, sizeof(r->kernel_stack), 0);
	if (size > 0)
		r->kernel_stack_depth = size / sizeof(u64);
}

static inline u64 rss_pages(void *mm, int member)
{
	long pages = 0;

	READ_AT(pages, mm, OFF_MM_RSS_STAT + member * RSS_STAT_STRIDE + OFF_RSS_COUNT);
	return pages > 0 ? pages : 0;
}

static inline void fill_memory(struct oom_kill_record *r, void *task)
{
	void *mm = NULL;
	unsigned long total_vm = 0;
	long pgtables = 0;

	READ_AT(mm, task, OFF_TASK_MM);
	if (!mm)
		return;
	READ_AT(total_vm, mm, OFF_MM_TOTAL_VM);
	READ_AT(pgtables, mm, OFF_MM_PGTABLES);
	r->total_vm_kb = total_vm * PAGE_SIZE_KB;
	r->file_rss_kb = rss_pages(mm, 0) * PAGE_SIZE_KB;	/* MM_FILEPAGES */
	r->anon_rss_kb = rss_pages(mm, 1) * PAGE_SIZE_KB;	/* MM_ANONPAGES */
	r->shmem_rss_kb = rss_pages(mm, 3) * PAGE_SIZE_KB;	/* MM_SHMEMPAGES */
	r->pgtables_kb = pgtables > 0 ? pgtables >> 10 : 0;
	r->flags |= OOM_F_MEMORY;
}

static inline void fill_cgroup(struct oom_kill_record *r, void *task)
{
	void *cgroups = NULL, *css = NULL, *cgroup = NULL, *kn = NULL;
	int i;

	READ_AT(cgroups, task, OFF_TASK_CGROUPS);
	if (!cgroups || MEMORY_CGRP_ID < 0)	/* no memory controller in this kernel */
		return;
	READ_AT(css, cgroups, OFF_CSS_SET_SUBSYS + MEMORY_CGRP_ID * sizeof(void *));
	if (!css)
		return;
	READ_AT(cgroup, css, OFF_CSS_CGROUP);
	if (!cgroup)
		return;
	READ_AT(kn, cgroup, OFF_CGROUP_KN);
	if (!kn)
		return;
	READ_AT(r->cgroup_id, kn, OFF_KN_ID);
	r->flags |= OOM_F_CGROUP;
#pragma unroll
	for (i = 0; i < OOM_CGROUP_MAX_DEPTH; i++) {
		void *parent = NULL, *name = NULL;
		long len;

		READ_AT(parent, kn, OFF_KN_PARENT);
		if (!parent)
			return;
		READ_AT(name, kn, OFF_KN_NAME);
		len = bpf_probe_read_kernel_str(r->cgroup_names[i], OOM_CGROUP_NAME_LEN, name);
		if (len == OOM_CGROUP_NAME_LEN)
			r->flags |= OOM_F_CGROUP_TRUNCATED;
		r->cgroup_depth = i + 1;
		kn = parent;
	}
	{
		void *parent = NULL;

		READ_AT(parent, kn, OFF_KN_PARENT);
		if (parent)
			r->flags |= OOM_F_CGROUP_TRUNCATED;
	}
}

static inline void fill_victim(struct oom_kill_record *r, void *task)
{
	void *signal = NULL, *cred = NULL;
	unsigned long pending = 0;
	short adj = 0;
	int tgid = 0, pid = 0;

	READ_AT(tgid, task, OFF_TASK_TGID);
	READ_AT(pid, task, OFF_TASK_PID);
	r->victim_pid = tgid;
	r->victim_tid = pid;
	READ_AT(cred, task, OFF_TASK_REAL_CRED);
	if (cred)
		READ_AT(r->victim_uid, cred, OFF_CRED_UID);
	READ_AT(signal, task, OFF_TASK_SIGNAL);
	if (signal) {
		READ_AT(adj, signal, OFF_SIGNAL_OOM_SCORE_ADJ);
		READ_AT(pending, signal, OFF_SIGNAL_PENDING);
		if (pending & SIGKILL_BIT)
			r->flags |= OOM_F_SIGKILL;
	}
	r->oom_score_adj = adj;
	bpf_probe_read_kernel_str(r->victim_comm, sizeof(r->victim_comm), task + OFF_TASK_COMM);
	r->flags |= OOM_F_VICTIM_TASK;
	fill_memory(r, task);
	fill_cgroup(r, task);
}

#ifdef HOOK_RAW_TP
int oom_mark_victim_raw(struct bpf_raw_tracepoint_args *ctx)
{
	void *task = (void *)ctx->args[0];
	struct oom_kill_record *r = record_reserve();

	if (!r)
		return 0;
	record_init(ctx, r, OOM_HOOK_RAW_TP);
	fill_victim(r, task);
	r->victim_uid = (u32)ctx->args[1];
#if defined(HOOK_KPROBE) && !defined(KPROBE_WRITES_RECORDS)
	{
		u32 tid = (u32)bpf_get_current_pid_tgid();
		struct oom_control_info *info = oom_controls.lookup(&tid);

		if (info && info->victim_pid == r->victim_pid) {
			r->oom_domain_pages = info->oom_domain_pages;
			r->badness_points = info->badness_points;
			r->flags |= OOM_F_OOM_CONTROL | OOM_F_CONSTRAINT_KNOWN;
			if (info->memcg)
				r->flags |= OOM_F_MEMCG;
			oom_controls.delete(&tid);
		}
	}
#endif
	record_submit(ctx, r);
	return 0;
}
#endif /* HOOK_RAW_TP */

#ifdef HOOK_KPROBE
int oom_kill_process_kprobe(struct pt_regs *ctx)
{
	void *oc = (void *)PT_REGS_PARM1(ctx);
	void *victim = NULL, *memcg = NULL;
	unsigned long totalpages = 0;
	long points = 0;

	READ_AT(victim, oc, OFF_OC_CHOSEN);
	if (!victim)
		return 0;
	READ_AT(memcg, oc, OFF_OC_MEMCG);
	READ_AT(totalpages, oc, OFF_OC_TOTALPAGES);
	READ_AT(points, oc, OFF_OC_CHOSEN_POINTS);
#ifdef KPROBE_WRITES_RECORDS
	{
		struct oom_kill_record *r = record_reserve();

		if (!r)
			return 0;
		record_init(ctx, r, OOM_HOOK_KPROBE);
		fill_victim(r, victim);
		r->oom_domain_pages = totalpages;
		r->badness_points = points;
		r->flags |= OOM_F_OOM_CONTROL | OOM_F_CONSTRAINT_KNOWN;
		if (memcg)
			r->flags |= OOM_F_MEMCG;
		record_submit(ctx, r);
	}
#else
	{
		u32 tid = (u32)bpf_get_current_pid_tgid();
		struct oom_control_info info = {};
		int tgid = 0;

		READ_AT(tgid, victim, OFF_TASK_TGID);
		info.oom_domain_pages = totalpages;
		info.badness_points = points;
		info.victim_pid = tgid;
		info.memcg = memcg != NULL;
		oom_controls.update(&tid, &info);
	}
#endif
	return 0;
}
#endif /* HOOK_KPROBE */

#ifdef HOOK_TRACEPOINT
TRACEPOINT_PROBE(oom, mark_victim)
{
	struct oom_kill_record *r = record_reserve();

	if (!r)
		return 0;
	record_init(args, r, OOM_HOOK_TRACEPOINT);
	r->victim_pid = args->pid;
	r->victim_tid = args->pid;
#ifdef MARK_VICTIM_HAS_MM
	TP_DATA_LOC_READ_STR(r->victim_comm, comm, sizeof(r->victim_comm));
	r->victim_uid = args->uid;
	r->oom_score_adj = args->oom_score_adj;
	r->flags |= OOM_F_VICTIM_TASK;
	r->total_vm_kb = args->total_vm;
	r->anon_rss_kb = args->anon_rss;
	r->file_rss_kb = args->file_rss;
	r->shmem_rss_kb = args->shmem_rss;
	r->pgtables_kb = args->pgtables;
	r->flags |= OOM_F_MEMORY;
#endif
	record_submit(args, r);
	return 0;
}
#endif /* HOOK_TRACEPOINT */
