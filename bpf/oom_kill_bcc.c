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
 *   HOOK_SIGNAL     raw_tracepoint/signal_generate: kill signals from user space
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
#define OFF_TASK_REAL_PARENT offsetof(struct task_struct, real_parent)
#define OFF_TASK_CHILDREN offsetof(struct task_struct, children)
#define OFF_TASK_SIBLING offsetof(struct task_struct, sibling)
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
#define OFF_TASK_START_BOOTTIME offsetof(struct task_struct, start_boottime)
#define OFF_MEMCG_EVENTS offsetof(struct mem_cgroup, memory_events)
#define MEMCG_EVENT_LOW MEMCG_LOW
#define MEMCG_EVENT_HIGH MEMCG_HIGH
#define MEMCG_EVENT_MAX MEMCG_MAX
#define MEMCG_EVENT_OOM MEMCG_OOM
#define MEMCG_EVENT_OOM_KILL MEMCG_OOM_KILL
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 17, 0)
#define MEMCG_EVENT_OOM_GROUP_KILL MEMCG_OOM_GROUP_KILL
#endif
#define OFF_CGROUP_PSI offsetof(struct cgroup, psi)
/* A pointer since the pressure groups became allocated per cgroup, the group itself before. */
#define CGROUP_PSI_IS_POINTER __builtin_types_compatible_p(typeof(((struct cgroup *)0)->psi), struct psi_group *)
#define OFF_PSI_AVG offsetof(struct psi_group, avg)
#define PSI_MEM_SOME_ROW PSI_MEM_SOME
#define PSI_MEM_FULL_ROW PSI_MEM_FULL
#endif /* OFFSETS_FROM_HEADERS */

#define SIGKILL_BIT (1UL << (9 - 1))
#define PAGE_KB PAGE_SIZE_KB

#define READ_AT(dst, base, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(base) + (off))
/* The value of a field of this type at base + off; 0 when the read fails. */
#define READ_VALUE(type, base, off) ({ type __value = 0; READ_AT(__value, base, off); __value; })

/* --- How this variant reads the kernel (see oom_kill_fill.h) -------------- */

static inline u32 read_task_tgid(struct task_struct *task)
{
	return READ_VALUE(int, task, OFF_TASK_TGID);
}

static inline u32 read_task_tid(struct task_struct *task)
{
	return READ_VALUE(int, task, OFF_TASK_PID);
}

static inline u32 read_task_uid(struct task_struct *task)
{
	void *cred = READ_VALUE(void *, task, OFF_TASK_REAL_CRED);

	return cred ? READ_VALUE(u32, cred, OFF_CRED_UID) : 0;
}

static inline void *read_task_signal(struct task_struct *task)
{
	return READ_VALUE(void *, task, OFF_TASK_SIGNAL);
}

static inline short read_task_oom_score_adj(struct task_struct *task)
{
	void *signal = read_task_signal(task);

	return signal ? READ_VALUE(short, signal, OFF_SIGNAL_OOM_SCORE_ADJ) : 0;
}

static inline bool read_task_sigkill_pending(struct task_struct *task)
{
	void *signal = read_task_signal(task);

	return signal && READ_VALUE(unsigned long, signal, OFF_SIGNAL_PENDING) & SIGKILL_BIT;
}

static inline void read_task_comm(struct task_struct *task, char *buf)
{
	bpf_probe_read_kernel_str(buf, OOM_COMM_LEN, (void *)task + OFF_TASK_COMM);
}

static inline struct mm_struct *read_task_mm(struct task_struct *task)
{
	return READ_VALUE(void *, task, OFF_TASK_MM);
}

static inline u64 read_mm_total_vm_pages(struct mm_struct *mm)
{
	return READ_VALUE(unsigned long, mm, OFF_MM_TOTAL_VM);
}

static inline long read_mm_rss_pages(struct mm_struct *mm, int counter)
{
	return READ_VALUE(long, mm, OFF_MM_RSS_STAT + counter * RSS_STAT_STRIDE + OFF_RSS_COUNT);
}

static inline long read_mm_pgtables_bytes(struct mm_struct *mm)
{
	return READ_VALUE(long, mm, OFF_MM_PGTABLES);
}

static inline struct kernfs_node *read_kn_parent(struct kernfs_node *kn)
{
	return READ_VALUE(void *, kn, OFF_KN_PARENT);
}

static inline const char *read_kn_name(struct kernfs_node *kn)
{
	return READ_VALUE(const char *, kn, OFF_KN_NAME);
}

static inline u64 read_kn_id(struct kernfs_node *kn)
{
	return READ_VALUE(u64, kn, OFF_KN_ID);
}

static inline struct task_struct *read_task_group_leader(struct task_struct *task)
{
	return READ_VALUE(void *, task, OFF_TASK_GROUP_LEADER);
}

static inline struct task_struct *read_task_real_parent(struct task_struct *task)
{
	return READ_VALUE(void *, task, OFF_TASK_REAL_PARENT);
}

static inline struct task_struct *read_task_oldest_child(struct task_struct *task)
{
	void *first = READ_VALUE(void *, task, OFF_TASK_CHILDREN);	/* children.next */

	return first ? first - OFF_TASK_SIBLING : NULL;
}

static inline u64 read_task_start_time(struct task_struct *task)
{
	return READ_VALUE(u64, task, OFF_TASK_START_TIME);
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
	void *cgroups = READ_VALUE(void *, task, OFF_TASK_CGROUPS), *css;

	if (!cgroups || MEMORY_CGRP_ID < 0)	/* no memory controller in this kernel */
		return NULL;
	css = READ_VALUE(void *, cgroups, OFF_CSS_SET_SUBSYS + MEMORY_CGRP_ID * sizeof(void *));
	return css ? css - OFF_MEMCG_CSS : NULL;
}

static inline struct mem_cgroup *read_memcg_parent(struct mem_cgroup *memcg)
{
	void *parent = READ_VALUE(void *, memcg, OFF_MEMCG_CSS + OFF_CSS_PARENT);

	return parent ? parent - OFF_MEMCG_CSS : NULL;
}

static inline void *read_memcg_cgroup(struct mem_cgroup *memcg)
{
	return READ_VALUE(void *, memcg, OFF_MEMCG_CSS + OFF_CSS_CGROUP);
}

static inline struct kernfs_node *read_memcg_kn(struct mem_cgroup *memcg)
{
	void *cgroup = read_memcg_cgroup(memcg);

	return cgroup ? READ_VALUE(void *, cgroup, OFF_CGROUP_KN) : NULL;
}

static inline u32 read_memcg_level(struct mem_cgroup *memcg)
{
	void *cgroup = read_memcg_cgroup(memcg);

	return cgroup ? READ_VALUE(int, cgroup, OFF_CGROUP_LEVEL) : 0;
}

static inline u64 read_memcg_usage(struct mem_cgroup *memcg)
{
	long pages = READ_VALUE(long, memcg, OFF_MEMCG_USAGE);

	return pages > 0 ? pages : 0;
}

static inline u64 read_memcg_max(struct mem_cgroup *memcg)
{
	return READ_VALUE(unsigned long, memcg, OFF_MEMCG_MAX);
}

static inline bool read_memcg_oom_group(struct mem_cgroup *memcg)
{
	return READ_VALUE(bool, memcg, OFF_MEMCG_OOM_GROUP);
}

static inline u64 read_task_start_boottime(struct task_struct *task)
{
	return READ_VALUE(u64, task, OFF_TASK_START_BOOTTIME);
}

static inline bool read_memcg_events(struct mem_cgroup *memcg, u64 *events)
{
	events[0] = READ_VALUE(long, memcg, OFF_MEMCG_EVENTS + MEMCG_EVENT_LOW * sizeof(long));
	events[1] = READ_VALUE(long, memcg, OFF_MEMCG_EVENTS + MEMCG_EVENT_HIGH * sizeof(long));
	events[2] = READ_VALUE(long, memcg, OFF_MEMCG_EVENTS + MEMCG_EVENT_MAX * sizeof(long));
	events[3] = READ_VALUE(long, memcg, OFF_MEMCG_EVENTS + MEMCG_EVENT_OOM * sizeof(long));
	events[4] = READ_VALUE(long, memcg, OFF_MEMCG_EVENTS + MEMCG_EVENT_OOM_KILL * sizeof(long));
#ifdef MEMCG_EVENT_OOM_GROUP_KILL	/* 5.17+ */
	events[5] = READ_VALUE(long, memcg, OFF_MEMCG_EVENTS + MEMCG_EVENT_OOM_GROUP_KILL * sizeof(long));
	return true;
#else
	return false;
#endif
}

static inline bool read_memcg_psi(struct mem_cgroup *memcg, u32 *some, u32 *full)
{
	void *cgroup = read_memcg_cgroup(memcg), *psi;

	if (!cgroup)
		return false;
	if (CGROUP_PSI_IS_POINTER)
		psi = READ_VALUE(void *, cgroup, OFF_CGROUP_PSI);
	else
		psi = cgroup + OFF_CGROUP_PSI;
	if (!psi)
		return false;
	/* avg[state][0], rows of three averages (10 s, 60 s, 300 s) */
	*some = READ_VALUE(unsigned long, psi, OFF_PSI_AVG + PSI_MEM_SOME_ROW * 3 * sizeof(long));
	*full = READ_VALUE(unsigned long, psi, OFF_PSI_AVG + PSI_MEM_FULL_ROW * 3 * sizeof(long));
	return true;
}

/* --- Maps ------------------------------------------------------------------ */

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(heap, struct oom_kill_record, 1);
#endif
BPF_ARRAY(dropped_kills, u64, 2);	/* records that found no room, by kind (OOM_DROPPED_*) */
BPF_TABLE("lru_hash", struct oom_reported_key, u8, reported_kills, 4096);
#ifdef HOOK_SIGNAL
struct killer_name {
	char comm[OOM_COMM_LEN];
};
BPF_HASH(memory_killers, struct killer_name, u8, 64);
#endif
#if defined(HOOK_KPROBE) && !defined(KPROBE_WRITES_RECORDS)
BPF_TABLE("lru_hash", u32, struct oom_control_info, oom_controls, 256);
#endif

static inline bool remember_reported(struct oom_reported_key *key)
{
	u8 one = 1;

	return reported_kills.insert(key, &one) == 0;
}

static inline bool is_memory_killer(const char *comm)
{
#ifdef HOOK_SIGNAL
	struct killer_name name = {};

	__builtin_memcpy(name.comm, comm, OOM_COMM_LEN);
	return memory_killers.lookup(&name) != NULL;
#else
	return false;
#endif
}

/* --- Output ----------------------------------------------------------------- */

static inline void count_drop(int kind)
{
	u64 *dropped = dropped_kills.lookup(&kind);

	if (dropped)
		__sync_fetch_and_add(dropped, 1);
}

static inline struct oom_kill_record *record_reserve(int kind)
{
	struct oom_kill_record *r;
#ifdef USE_RINGBUF
	r = events.ringbuf_reserve(sizeof(struct oom_kill_record));
	if (!r)
		count_drop(kind);
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
		count_drop(record_kind(r));	/* the perf ring was full */
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

	if (newly_killed(task, true))
		report_kill(ctx, task, OOM_HOOK_RAW_TP, oom_control_of_trigger());
	return 0;
}
#endif /* HOOK_RAW_TP */

#ifdef HOOK_KILL_KPROBE
int oom_kill_victim_kprobe(struct pt_regs *ctx)
{
	struct task_struct *victim = (struct task_struct *)PT_REGS_PARM1(ctx);

	/* The kernel kills only a victim with memory left; SIGKILL is sent after this point. */
	if (read_task_mm(victim) && newly_killed(victim, false))
		report_kill(ctx, victim, OOM_HOOK_KILL_KPROBE, oom_control_of_trigger());
	return 0;
}
#endif /* HOOK_KILL_KPROBE */

#ifdef HOOK_KPROBE
int oom_kill_process_kprobe(struct pt_regs *ctx)
{
	void *oc = (void *)PT_REGS_PARM1(ctx);
	struct task_struct *victim = READ_VALUE(void *, oc, OFF_OC_CHOSEN);
	struct oom_control_info info = {};

	if (!victim)
		return 0;
	read_oom_control(&info, READ_VALUE(void *, oc, OFF_OC_MEMCG), READ_VALUE(unsigned long, oc, OFF_OC_TOTALPAGES),
			 READ_VALUE(long, oc, OFF_OC_CHOSEN_POINTS), read_task_tgid(victim));
#ifdef KPROBE_WRITES_RECORDS
	if (newly_killed(victim, false))
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

#ifdef HOOK_SIGNAL
/* signal_generate(sig, info, task, group, result) */
int signal_generate_raw(struct bpf_raw_tracepoint_args *ctx)
{
	int sig = (int)ctx->args[0];
	struct task_struct *task = (struct task_struct *)ctx->args[2];

	if (kill_signal_sent(sig, (void *)ctx->args[1], (int)ctx->args[4]) && kill_to_report(task, sig))
		report_signal(ctx, task, sig, OOM_HOOK_SIGNAL_RAW_TP);
	return 0;
}
#endif /* HOOK_SIGNAL */

#ifdef HOOK_TRACEPOINT
TRACEPOINT_PROBE(oom, mark_victim)
{
	struct oom_kill_record *r = record_reserve(OOM_DROPPED_KERNEL);

	if (!r)
		return 0;
	record_init(r, OOM_HOOK_TRACEPOINT);
	set_victim_thread(r, args->pid);
	/* A dying process marked while it allocates is the trigger: its task is known, and may be
	 * one already reported. */
	if (r->victim_tid == r->trigger_tid &&
	    !newly_killed((struct task_struct *)bpf_get_current_task(), true)) {
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
