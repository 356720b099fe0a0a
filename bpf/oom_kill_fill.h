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
 *   struct task_struct *read_task_group_leader(...); __u64 read_task_start_time(...)
 *   struct task_struct *read_task_real_parent(...)
 *   struct task_struct *read_task_oldest_child(...)  the first of its children list (any if none)
 *   bool read_task_ns_pid(struct task_struct *, __u32 *nr, __u8 *level)  in its own pid namespace
 *   struct mem_cgroup *read_task_memcg(...)   its memory cgroup, or NULL
 *   struct mem_cgroup *read_memcg_parent(...); struct kernfs_node *read_memcg_kn(...)
 *   __u32 read_memcg_level(...); __u64 read_memcg_usage(...), read_memcg_max(...) (pages)
 *   bool read_memcg_oom_group(...)
 *   struct kernfs_node *read_kn_parent(...); const char *read_kn_name(...); __u64 read_kn_id(...)
 *   bool remember_reported(struct oom_reported_key *)  true the first time (a map of its own)
 *   __u64 read_task_start_boottime(...)
 *   bool read_memcg_events(struct mem_cgroup *, __u64 *events)  OOM_MEMCG_EVENTS of memory.events;
 *                                                  true when oom_group_kill is the kernel's own
 *   bool read_memcg_psi(struct mem_cgroup *, __u32 *some, __u32 *full)  memory pressure, avg10
 *   bool is_memory_killer(const char *comm)        a name in the memory_killers map
 * and how it writes records:
 *   struct oom_kill_record *record_reserve(kind); void record_submit(void *ctx, record)
 *                          (kind: the dropped_kills slot a record with no room counts in)
 *   struct oom_control_info *oom_control_of_trigger(void)   the kprobe's facts, or NULL
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

/* Memory cgroup levels walked up, at most (a Kubernetes container's is 4 or 5 deep). */
#define OOM_MEMCG_MAX_LEVELS 16
/* A charge that failed leaves less room than this under the limit (a huge page is 512 pages). */
#define OOM_CHARGE_MAX_PAGES 512

/* The victim's memory cgroup path, leaf first, read now: it may be gone soon. */
static __always_inline void fill_cgroup(struct oom_kill_record *r, struct task_struct *task)
{
	struct mem_cgroup *memcg = read_task_memcg(task);
	struct kernfs_node *kn;
	int i;

	if (!memcg)
		return;
	kn = read_memcg_kn(memcg);
	if (!kn)
		return;
	r->cgroup_id = read_kn_id(kn);
	r->cgroup_level = read_memcg_level(memcg);
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

static __always_inline void set_domain(struct oom_kill_record *r, __u32 level, __u64 usage, __u64 max)
{
	r->domain_level = level;
	r->domain_usage_pages = usage;
	r->domain_limit_pages = max;
	r->flags |= OOM_F_DOMAIN;
}

/*
 * Without oom_control: the memory cgroup whose limit the charge hit is the first one, from the
 * trigger's up, left with less room than a charge (try_charge walks the counters from the
 * charging cgroup up and fails at the first one the charge would overflow).
 */
static __always_inline void guess_domain(struct oom_kill_record *r)
{
	struct mem_cgroup *memcg = read_task_memcg((struct task_struct *)bpf_get_current_task());
	int i;

	for (i = 0; i < OOM_MEMCG_MAX_LEVELS; i++) {	/* a bounded loop (5.3+) */
		__u64 usage, max;

		if (!memcg)
			return;
		usage = read_memcg_usage(memcg);
		max = read_memcg_max(memcg);
		if (usage + OOM_CHARGE_MAX_PAGES > max) {
			set_domain(r, read_memcg_level(memcg), usage, max);
			r->flags |= OOM_F_DOMAIN_GUESSED;
			return;
		}
		memcg = read_memcg_parent(memcg);
	}
}

/* The cgroup killed as a whole with the victim: the highest one with memory.oom.group set, from
 * the victim's up to the OOM domain (as mem_cgroup_get_oom_group chooses it). Without a memory
 * cgroup out of room, the system is: its domain is the root, and the walk goes up to it. */
static __always_inline void fill_group(struct oom_kill_record *r, struct task_struct *task)
{
	struct mem_cgroup *memcg = read_task_memcg(task);
	__u32 domain_level = (r->flags & OOM_F_DOMAIN) ? r->domain_level : 0;
	int i;

	for (i = 0; i < OOM_MEMCG_MAX_LEVELS; i++) {	/* a bounded loop (5.3+) */
		__u32 level;

		if (!memcg)
			return;
		level = read_memcg_level(memcg);
		if (level < domain_level)
			return;
		if (read_memcg_oom_group(memcg))
			r->group_level = level;
		memcg = read_memcg_parent(memcg);
	}
}

/* Whether to report this mark of a task: once per process the kernel killed. mark_victim also
 * fires for threads of a process already dying, and for exiting tasks marked without a kill. */
static __always_inline bool newly_killed(struct task_struct *task, bool after_sigkill)
{
	struct oom_reported_key key = {};

	if (after_sigkill && !read_task_sigkill_pending(task))
		return false;	/* an exiting task marked, no SIGKILL: the kernel killed nothing */
	key.tgid = read_task_tgid(task);
	key.start_time = read_task_start_time(read_task_group_leader(task));
	return remember_reported(&key);	/* else a thread of a process already reported */
}

/* Who the victim's parent is, seen from the victim's pid namespace: whether its death ends its
 * container depends on it (a minimal init as pid 1 exits when the child it started does). */
static __always_inline void fill_parent(struct oom_kill_record *r, struct task_struct *leader)
{
	struct task_struct *parent = read_task_real_parent(leader);
	__u32 nr = 0;
	__u8 level = 0;

	if (!parent)
		return;
	/* Children hang on the thread that forked them: its list, the process's identity. */
	if (read_task_oldest_child(parent) == leader)
		r->flags |= OOM_F_OLDEST_CHILD;
	parent = read_task_group_leader(parent);
	r->parent_pid = read_task_tgid(parent);
	read_task_comm(parent, r->parent_comm);
	/* A parent is in the victim's namespace or an ancestor of it: at the same depth, in it. */
	if (read_task_ns_pid(parent, &nr, &level) && level == r->pid_ns_level)
		r->parent_ns_pid = nr;
	r->flags |= OOM_F_PARENT;
}

static __always_inline void fill_victim(struct oom_kill_record *r, struct task_struct *task)
{
	struct task_struct *leader = read_task_group_leader(task);

	r->victim_pid = read_task_tgid(task);
	r->victim_tid = read_task_tid(task);
	r->victim_uid = read_task_uid(task);
	r->oom_score_adj = read_task_oom_score_adj(task);
	read_task_comm(task, r->victim_comm);
	r->flags |= OOM_F_VICTIM_TASK;
	if (read_task_ns_pid(leader, &r->victim_ns_pid, &r->pid_ns_level)) {
		r->flags |= OOM_F_PID_NS;
		fill_parent(r, leader);
	}
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

/* What the kprobe on oom_kill_process read of the OOM: the domain, and the chosen victim's badness. */
static __always_inline void read_oom_control(struct oom_control_info *info, struct mem_cgroup *memcg,
					     __u64 totalpages, __s64 points, __u32 victim_pid)
{
	info->oom_domain_pages = totalpages;
	info->badness_points = points;
	info->victim_pid = victim_pid;
	info->memcg = memcg != NULL;
	if (memcg) {
		info->domain_level = read_memcg_level(memcg);
		info->domain_usage_pages = read_memcg_usage(memcg);
		info->domain_limit_pages = read_memcg_max(memcg);
	}
}

static __always_inline void set_oom_control(struct oom_kill_record *r, struct oom_control_info *info)
{
	r->oom_domain_pages = info->oom_domain_pages;
	r->flags |= OOM_F_OOM_CONTROL | OOM_F_CONSTRAINT_KNOWN;
	/* The badness is the chosen victim's; the other members of a group kill were not ranked. */
	if (info->victim_pid == r->victim_pid) {
		r->badness_points = info->badness_points;
		r->flags |= OOM_F_CHOSEN;
	}
	if (info->memcg) {
		r->flags |= OOM_F_MEMCG;
		set_domain(r, info->domain_level, info->domain_usage_pages, info->domain_limit_pages);
	}
}

/*
 * Without oom_control, whether a memory cgroup or the system ran out of memory
 * shows in the trigger's kernel stack (mem_cgroup_out_of_memory...): keep it
 * for user space to resolve with /proc/kallsyms when it reads the record.
 */
static __always_inline void fill_kernel_stack(void *ctx, struct oom_kill_record *r)
{
	long size = bpf_get_stack(ctx, r->kernel_stack, sizeof(r->kernel_stack), 0);

	if (size > 0)
		r->kernel_stack_depth = size / sizeof(__u64);
}

/* The record of a process the kernel killed, seen with its task; info: the kprobe's oom_control
 * facts, when it left them (else the trigger's stack and a guess at the cgroup that ran out). */
static __always_inline void report_kill(void *ctx, struct task_struct *task, __u8 hook,
					struct oom_control_info *info)
{
	struct oom_kill_record *r = record_reserve(OOM_DROPPED_KERNEL);

	if (!r)
		return;
	record_init(r, hook);
	fill_victim(r, task);
	if (info) {
		set_oom_control(r, info);
	} else {
		fill_kernel_stack(ctx, r);
		guess_domain(r);
	}
	fill_group(r, task);
	record_submit(ctx, r);
}

/* --- Kill signals sent from user space ------------------------------------------------------ */

/* Named here: the kernel headers BCC may include define some of them too. */
#define OOM_SIGKILL 9
#define OOM_SIGTERM 15
#define OOM_TRACE_SIGNAL_DELIVERED 0	/* signal_generate's result */
#define OOM_SEND_SIG_PRIV ((void *)1)	/* the siginfo of a signal the kernel sends itself */

/* The first test every signal on the host meets (SIGCHLD at every exit): cheap. A signal the
 * kernel sends itself (SEND_SIG_PRIV: its OOM killer, a pid namespace's end) is not user space's;
 * one ignored, or already pending, changes nothing. */
static __always_inline bool kill_signal_sent(int sig, const void *info, int result)
{
	return (sig == OOM_SIGKILL || sig == OOM_SIGTERM) && result == OOM_TRACE_SIGNAL_DELIVERED &&
	       info != OOM_SEND_SIG_PRIV;
}

/* Whether the target's pid namespace sees it, or its process's parent, as pid 1 (a container's
 * main process, or the child of its minimal init). */
static __always_inline bool container_main_candidate(struct task_struct *leader, struct task_struct *sender)
{
	struct task_struct *parent;
	__u32 nr = 0, parent_nr = 0;
	__u8 level = 0, parent_level = 0;

	if (!read_task_ns_pid(leader, &nr, &level) || level == 0)
		return false;	/* in the host's pid namespace: no container of its own */
	if (nr == 1)
		return true;
	parent = read_task_real_parent(leader);
	if (!parent || read_task_tgid(parent) == read_task_tgid(sender))
		return false;	/* a process killing its own child: its business */
	return read_task_ns_pid(parent, &parent_nr, &parent_level) && parent_level == level && parent_nr == 1;
}

/* A kill signal worth a record: from a known memory killer (to anyone), or a SIGKILL that may end
 * a container (exit 137), from anyone but the target itself. */
static __always_inline bool kill_to_report(struct task_struct *task, int sig)
{
	struct task_struct *sender = (struct task_struct *)bpf_get_current_task();
	struct task_struct *leader;
	char comm[OOM_COMM_LEN] = {};

	if (read_task_tgid(sender) == read_task_tgid(task))
		return false;
	bpf_get_current_comm(comm, sizeof(comm));
	if (is_memory_killer(comm))
		return true;
	if (sig != OOM_SIGKILL)
		return false;
	leader = read_task_group_leader(task);
	return leader && container_main_candidate(leader, sender);
}

/* The victim's memory cgroup as the signal found it: it is often gone by the next check run. */
static __always_inline void fill_memcg_state(struct oom_kill_record *r, struct task_struct *task)
{
	struct mem_cgroup *memcg = read_task_memcg(task);

	if (!memcg)
		return;
	r->domain_level = read_memcg_level(memcg);
	r->domain_usage_pages = read_memcg_usage(memcg);
	r->domain_limit_pages = read_memcg_max(memcg);
	if (read_memcg_events(memcg, r->memcg_events))
		r->flags |= OOM_F_OOM_GROUP_KILL_EVENT;
	r->flags |= OOM_F_MEMCG_STATE;
	if (read_memcg_psi(memcg, &r->psi_memory_some_avg10, &r->psi_memory_full_avg10))
		r->flags |= OOM_F_PSI;
}

static __always_inline void report_signal(void *ctx, struct task_struct *task, int sig, __u8 hook)
{
	struct oom_kill_record *r = record_reserve(OOM_DROPPED_SIGNAL);
	struct task_struct *leader;

	/* Nothing between the reservation and its test: before 6.x the verifier, seeing the test
	 * again later, takes a path that never releases the record (6.1 refused the program so). */
	if (!r)
		return;
	record_init(r, hook);	/* the trigger is the sender */
	r->signal = sig;
	fill_victim(r, task);
	leader = read_task_group_leader(task);
	if (leader)
		r->victim_start_time = read_task_start_boottime(leader);
	fill_memcg_state(r, task);
	record_submit(ctx, r);
}

#endif /* EBPF_PROBE_OOM_KILL_FILL_H */
