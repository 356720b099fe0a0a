// SPDX-License-Identifier: GPL-2.0
/*
 * OOM-kill probe, runtime-compiled variant: BCC compiles this text on the
 * host when the CO-RE object cannot be loaded. Same record, same hooks as
 * oom_kill.bpf.c, filled by the same code (oom_kill_fill.h); user space
 * defines which hooks to build:
 *   HOOK_RAW_TP     raw_tracepoint/mark_victim, task argument (~6.9+)
 *   HOOK_KILL_KPROBE kprobe/__oom_kill_process, each process killed
 *   HOOK_KPROBE     kprobe/oom_kill_process; KPROBE_WRITES_RECORDS unless
 *                   one of the two above is built too
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

/* Used through pointers only, whatever the headers declare. */
struct task_struct;
struct mm_struct;
struct kernfs_node;
struct mem_cgroup;

#ifdef OFFSETS_FROM_HEADERS
#include <linux/version.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/cred.h>
#include <linux/mm_types.h>
#include <linux/cgroup-defs.h>
#include <linux/kernfs.h>
#include <linux/oom.h>
#include <linux/pid.h>
#include <linux/memcontrol.h>
#define OFF_TASK_PID offsetof(struct task_struct, pid)
#define OFF_TASK_TGID offsetof(struct task_struct, tgid)
#define OFF_TASK_COMM offsetof(struct task_struct, comm)
#define OFF_TASK_MM offsetof(struct task_struct, mm)
#define OFF_TASK_SIGNAL offsetof(struct task_struct, signal)
#define OFF_TASK_REAL_CRED offsetof(struct task_struct, real_cred)
#define OFF_TASK_CGROUPS offsetof(struct task_struct, cgroups)
#define OFF_TASK_GROUP_LEADER offsetof(struct task_struct, group_leader)
#define OFF_TASK_START_TIME offsetof(struct task_struct, start_time)
#define OFF_TASK_THREAD_PID offsetof(struct task_struct, thread_pid)
#define OFF_PID_LEVEL offsetof(struct pid, level)
#define OFF_PID_NUMBERS offsetof(struct pid, numbers)
#define UPID_SIZE sizeof(struct upid)
#define OFF_UPID_NR offsetof(struct upid, nr)
#define OFF_CSS_PARENT offsetof(struct cgroup_subsys_state, parent)
#define OFF_CGROUP_LEVEL offsetof(struct cgroup, level)
#define OFF_MEMCG_CSS offsetof(struct mem_cgroup, css)
#define OFF_MEMCG_USAGE (offsetof(struct mem_cgroup, memory) + offsetof(struct page_counter, usage))
#define OFF_MEMCG_MAX (offsetof(struct mem_cgroup, memory) + offsetof(struct page_counter, max))
#define OFF_MEMCG_OOM_GROUP offsetof(struct mem_cgroup, oom_group)
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
#define PAGE_KB PAGE_SIZE_KB

#define READ_AT(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))

/* --- How this variant reads the kernel (see oom_kill_fill.h) -------------- */

static inline u32 read_task_tgid(struct task_struct *task)
{
	int tgid = 0;

	READ_AT(tgid, task, OFF_TASK_TGID);
	return tgid;
}

static inline u32 read_task_tid(struct task_struct *task)
{
	int pid = 0;

	READ_AT(pid, task, OFF_TASK_PID);
	return pid;
}

static inline u32 read_task_uid(struct task_struct *task)
{
	void *cred = NULL;
	u32 uid = 0;

	READ_AT(cred, task, OFF_TASK_REAL_CRED);
	if (cred)
		READ_AT(uid, cred, OFF_CRED_UID);
	return uid;
}

static inline void *read_task_signal(struct task_struct *task)
{
	void *signal = NULL;

	READ_AT(signal, task, OFF_TASK_SIGNAL);
	return signal;
}

static inline short read_task_oom_score_adj(struct task_struct *task)
{
	void *signal = read_task_signal(task);
	short adj = 0;

	if (signal)
		READ_AT(adj, signal, OFF_SIGNAL_OOM_SCORE_ADJ);
	return adj;
}

static inline bool read_task_sigkill_pending(struct task_struct *task)
{
	void *signal = read_task_signal(task);
	unsigned long pending = 0;

	if (signal)
		READ_AT(pending, signal, OFF_SIGNAL_PENDING);
	return pending & SIGKILL_BIT;
}

static inline void read_task_comm(struct task_struct *task, char *buf)
{
	bpf_probe_read_kernel_str(buf, OOM_COMM_LEN, (void *)task + OFF_TASK_COMM);
}

static inline struct mm_struct *read_task_mm(struct task_struct *task)
{
	void *mm = NULL;

	READ_AT(mm, task, OFF_TASK_MM);
	return mm;
}

static inline u64 read_mm_total_vm_pages(struct mm_struct *mm)
{
	unsigned long total_vm = 0;

	READ_AT(total_vm, mm, OFF_MM_TOTAL_VM);
	return total_vm;
}

static inline long read_mm_rss_pages(struct mm_struct *mm, int counter)
{
	long pages = 0;

	READ_AT(pages, mm, OFF_MM_RSS_STAT + counter * RSS_STAT_STRIDE + OFF_RSS_COUNT);
	return pages;
}

static inline long read_mm_pgtables_bytes(struct mm_struct *mm)
{
	long bytes = 0;

	READ_AT(bytes, mm, OFF_MM_PGTABLES);
	return bytes;
}

static inline struct kernfs_node *read_kn_parent(struct kernfs_node *kn)
{
	void *parent = NULL;

	READ_AT(parent, kn, OFF_KN_PARENT);
	return parent;
}

static inline const char *read_kn_name(struct kernfs_node *kn)
{
	const char *name = NULL;

	READ_AT(name, kn, OFF_KN_NAME);
	return name;
}

static inline u64 read_kn_id(struct kernfs_node *kn)
{
	u64 id = 0;

	READ_AT(id, kn, OFF_KN_ID);
	return id;
}

static inline struct task_struct *read_task_group_leader(struct task_struct *task)
{
	void *leader = NULL;

	READ_AT(leader, task, OFF_TASK_GROUP_LEADER);
	return leader;
}

static inline u64 read_task_start_time(struct task_struct *task)
{
	u64 start = 0;

	READ_AT(start, task, OFF_TASK_START_TIME);
	return start;
}

static inline bool read_task_ns_pid(struct task_struct *task, u32 *nr, u8 *level)
{
	void *pid = NULL;
	unsigned int depth = 0;
	int value = 0;

	READ_AT(pid, task, OFF_TASK_THREAD_PID);
	if (!pid || READ_AT(depth, pid, OFF_PID_LEVEL) ||
	    READ_AT(value, pid, OFF_PID_NUMBERS + depth * UPID_SIZE + OFF_UPID_NR))
		return false;
	*nr = value;
	*level = depth;
	return true;
}

static inline struct mem_cgroup *read_task_memcg(struct task_struct *task)
{
	void *cgroups = NULL, *css = NULL;

	READ_AT(cgroups, task, OFF_TASK_CGROUPS);
	if (!cgroups || MEMORY_CGRP_ID < 0)	/* no memory controller in this kernel */
		return NULL;
	READ_AT(css, cgroups, OFF_CSS_SET_SUBSYS + MEMORY_CGRP_ID * sizeof(void *));
	return css ? css - OFF_MEMCG_CSS : NULL;
}

static inline struct mem_cgroup *read_memcg_parent(struct mem_cgroup *memcg)
{
	void *parent = NULL;

	READ_AT(parent, memcg, OFF_MEMCG_CSS + OFF_CSS_PARENT);
	return parent ? parent - OFF_MEMCG_CSS : NULL;
}

static inline void *read_memcg_cgroup(struct mem_cgroup *memcg)
{
	void *cgroup = NULL;

	READ_AT(cgroup, memcg, OFF_MEMCG_CSS + OFF_CSS_CGROUP);
	return cgroup;
}

static inline struct kernfs_node *read_memcg_kn(struct mem_cgroup *memcg)
{
	void *cgroup = read_memcg_cgroup(memcg), *kn = NULL;

	if (cgroup)
		READ_AT(kn, cgroup, OFF_CGROUP_KN);
	return kn;
}

static inline u32 read_memcg_level(struct mem_cgroup *memcg)
{
	void *cgroup = read_memcg_cgroup(memcg);
	int level = 0;

	if (cgroup)
		READ_AT(level, cgroup, OFF_CGROUP_LEVEL);
	return level;
}

static inline u64 read_memcg_usage(struct mem_cgroup *memcg)
{
	long pages = 0;

	READ_AT(pages, memcg, OFF_MEMCG_USAGE);
	return pages > 0 ? pages : 0;
}

static inline u64 read_memcg_max(struct mem_cgroup *memcg)
{
	unsigned long max = 0;

	READ_AT(max, memcg, OFF_MEMCG_MAX);
	return max;
}

static inline bool read_memcg_oom_group(struct mem_cgroup *memcg)
{
	bool group = false;

	READ_AT(group, memcg, OFF_MEMCG_OOM_GROUP);
	return group;
}

/* --- Maps ------------------------------------------------------------------ */

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(heap, struct oom_kill_record, 1);
#endif
BPF_ARRAY(dropped_kills, u64, 1);
BPF_ARRAY(oom_marks, u64, OOM_MARKS_SLOTS);
BPF_TABLE("lru_hash", struct oom_reported_key, u8, reported_kills, 4096);
#if defined(HOOK_KPROBE) && !defined(KPROBE_WRITES_RECORDS)
BPF_TABLE("lru_hash", u32, struct oom_control_info, oom_controls, 256);
#endif

static inline bool remember_reported(struct oom_reported_key *key)
{
	u8 one = 1;

	return reported_kills.insert(key, &one) == 0;
}

static inline void count_unreported(int slot)
{
	u64 *count = oom_marks.lookup(&slot);

	if (count)
		__sync_fetch_and_add(count, 1);
}

/* --- Output ----------------------------------------------------------------- */

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
	if (!r)
		count_drop();
#else
	int zero = 0;

	r = heap.lookup(&zero);
#endif
	return r;
}

static inline void record_discard(struct oom_kill_record *r)
{
#ifdef USE_RINGBUF
	events.ringbuf_discard(r, 0);
#endif
}

static inline void record_submit(void *ctx, struct oom_kill_record *r)
{
#ifdef USE_RINGBUF
	events.ringbuf_submit(r, 0);
#else
	if (events.perf_submit(ctx, r, sizeof(*r)))
		count_drop();	/* the perf ring was full */
#endif
}

/* The oom_kill_process kprobe's facts about the OOM the current task triggered, if it left them. */
static inline struct oom_control_info *oom_control_of_trigger(void)
{
#if defined(HOOK_KPROBE) && !defined(KPROBE_WRITES_RECORDS)
	u32 tid = (u32)bpf_get_current_pid_tgid();

	return oom_controls.lookup(&tid);
#else
	return NULL;
#endif
}

#include "oom_kill_fill.h"

/* --- Hooks ----------------------------------------------------------------- */

#ifdef HOOK_RAW_TP
int oom_mark_victim_raw(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task = (struct task_struct *)ctx->args[0];

	if (first_kill_of(task, true))
		report_kill(ctx, task, OOM_HOOK_RAW_TP, oom_control_of_trigger());
	return 0;
}
#endif /* HOOK_RAW_TP */

#ifdef HOOK_KILL_KPROBE
int oom_kill_victim_kprobe(struct pt_regs *ctx)
{
	struct task_struct *victim = (struct task_struct *)PT_REGS_PARM1(ctx);

	/* The kernel kills only a victim with memory left; SIGKILL is sent after this point. */
	if (read_task_mm(victim) && first_kill_of(victim, false))
		report_kill(ctx, victim, OOM_HOOK_KILL_KPROBE, oom_control_of_trigger());
	return 0;
}
#endif /* HOOK_KILL_KPROBE */

#ifdef HOOK_KPROBE
int oom_kill_process_kprobe(struct pt_regs *ctx)
{
	void *oc = (void *)PT_REGS_PARM1(ctx);
	struct task_struct *victim = NULL;
	struct oom_control_info info = {};
	void *memcg = NULL;
	unsigned long totalpages = 0;
	long points = 0;

	READ_AT(victim, oc, OFF_OC_CHOSEN);
	if (!victim)
		return 0;
	READ_AT(memcg, oc, OFF_OC_MEMCG);
	READ_AT(totalpages, oc, OFF_OC_TOTALPAGES);
	READ_AT(points, oc, OFF_OC_CHOSEN_POINTS);
	read_oom_control(&info, memcg, totalpages, points, read_task_tgid(victim));
#ifdef KPROBE_WRITES_RECORDS
	if (first_kill_of(victim, false))
		report_kill(ctx, victim, OOM_HOOK_KPROBE, &info);
#else
	{
		u32 tid = (u32)bpf_get_current_pid_tgid();

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
	record_init(r, OOM_HOOK_TRACEPOINT);
	set_victim_thread(r, args->pid);
	/* A dying process marked while it allocates is the trigger: its task is known, and may be
	 * one already reported. */
	if (r->victim_tid == r->trigger_tid &&
	    !first_kill_of((struct task_struct *)bpf_get_current_task(), true)) {
		record_discard(r);
		return 0;
	}
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
	fill_kernel_stack(args, r);
	record_submit(args, r);
	return 0;
}
#endif /* HOOK_TRACEPOINT */
