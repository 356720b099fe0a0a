// SPDX-License-Identifier: GPL-2.0
/*
 * OOM-kill probe, CO-RE variant: compiled once with clang, relocated by
 * libbpf against the running kernel's BTF.
 *
 * Four hooks; user space autoloads and attaches the ones this kernel offers
 * (the table in datadog_checks/ebpf_probe/oom_kill/hooks.py):
 *  - tp_btf/mark_victim: the task argument (kernels whose tracepoint passes
 *    the task, ~6.9+ and backports) gives the victim; current is the trigger.
 *    It fires for every process killed, the members of a group kill too.
 *  - kprobe/__oom_kill_process: the same, where the tracepoint passes only a
 *    pid: called once per process killed.
 *  - kprobe/oom_kill_process: oc->chosen is the victim; oc gives the OOM
 *    domain, its size, the badness points and memcg vs system. Beside one of
 *    the above it only leaves these facts for them; alone it writes the
 *    record of the chosen victim.
 *  - tracepoint/oom/mark_victim: the classic tracepoint's fields, for kernels
 *    that offer none of the above.
 * And the kills user space sends: tp_btf/signal_generate sees every signal;
 * SIGKILL and SIGTERM from a known memory killer, and SIGKILL to a container's
 * main process, are recorded with the victim's memory cgroup as they found it.
 * Records go to a ring buffer, or a perf buffer where the kernel has none
 * (user space decides, and sets use_ringbuf); a record that finds no room is
 * counted in dropped_kills, once.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "oom_kill.h"

char LICENSE[] SEC("license") = "GPL";

#define SIGKILL 9

/* Set by user space before load. */
const volatile __u64 page_size_kb = 4;
/* kprobe/oom_kill_process writes records itself where no hook sees each victim's task. */
const volatile bool kprobe_writes_records = true;
/* Ring buffer (5.8+), else perf buffer: the events map's type, set to match. */
const volatile bool use_ringbuf = true;

#define PAGE_KB page_size_kb

/* --- How this variant reads the kernel (see oom_kill_fill.h) -------------- */

static __always_inline __u32 read_task_tgid(struct task_struct *task)
{
	return BPF_CORE_READ(task, tgid);
}

static __always_inline __u32 read_task_tid(struct task_struct *task)
{
	return BPF_CORE_READ(task, pid);
}

static __always_inline __u32 read_task_uid(struct task_struct *task)
{
	return BPF_CORE_READ(task, real_cred, uid.val);
}

static __always_inline short read_task_oom_score_adj(struct task_struct *task)
{
	return BPF_CORE_READ(task, signal, oom_score_adj);
}

static __always_inline bool read_task_sigkill_pending(struct task_struct *task)
{
	return BPF_CORE_READ(task, signal, shared_pending.signal.sig[0]) & (1UL << (SIGKILL - 1));
}

static __always_inline void read_task_comm(struct task_struct *task, char *buf)
{
	bpf_probe_read_kernel_str(buf, OOM_COMM_LEN, &task->comm);
}

static __always_inline struct mm_struct *read_task_mm(struct task_struct *task)
{
	return BPF_CORE_READ(task, mm);
}

static __always_inline __u64 read_mm_total_vm_pages(struct mm_struct *mm)
{
	return BPF_CORE_READ(mm, total_vm);
}

/*
 * mm->rss_stat[i] in pages. A macro: the index must be a constant where the
 * relocation is made, so that libbpf can scale it by the kernel's element size
 * (struct percpu_counter's size varies with the kernel's configuration).
 */
#define read_mm_rss_pages(mm, i)							\
	(bpf_core_type_exists(struct mm_rss_stat) ?	/* before 6.2: atomics */	\
	 BPF_CORE_READ((struct mm_struct___atomic_rss *)(mm), rss_stat.count[i].counter) : \
	 BPF_CORE_READ((mm), rss_stat[i].count))

static __always_inline long read_mm_pgtables_bytes(struct mm_struct *mm)
{
	return BPF_CORE_READ(mm, pgtables_bytes.counter);
}

static __always_inline struct kernfs_node *read_kn_parent(struct kernfs_node *kn)
{
	struct kernfs_node___rcu_parent *rcu_kn = (void *)kn;

	if (bpf_core_field_exists(rcu_kn->__parent))	/* 6.15+ */
		return BPF_CORE_READ(rcu_kn, __parent);
	return BPF_CORE_READ(kn, parent);
}

static __always_inline const char *read_kn_name(struct kernfs_node *kn)
{
	return BPF_CORE_READ(kn, name);
}

static __always_inline __u64 read_kn_id(struct kernfs_node *kn)
{
	return BPF_CORE_READ(kn, id);
}

static __always_inline struct task_struct *read_task_group_leader(struct task_struct *task)
{
	return BPF_CORE_READ(task, group_leader);
}

static __always_inline struct task_struct *read_task_real_parent(struct task_struct *task)
{
	return BPF_CORE_READ(task, real_parent);
}

static __always_inline struct task_struct *read_task_oldest_child(struct task_struct *task)
{
	struct list_head *first = BPF_CORE_READ(task, children.next);

	return first ? (void *)first - bpf_core_field_offset(struct task_struct, sibling) : NULL;
}

static __always_inline __u64 read_task_start_time(struct task_struct *task)
{
	return BPF_CORE_READ(task, start_time);
}

static __always_inline bool read_task_ns_pid(struct task_struct *task, __u32 *nr, __u8 *level)
{
	struct pid *pid = BPF_CORE_READ(task, thread_pid);
	unsigned int depth;

	if (!pid)
		return false;
	depth = BPF_CORE_READ(pid, level);
	/* numbers[depth]: the upid size is the kernel's, as relocated. */
	if (bpf_core_read(nr, sizeof(*nr), (void *)&pid->numbers[0].nr + depth * bpf_core_type_size(struct upid)))
		return false;
	*level = depth;
	return true;
}

static __always_inline struct mem_cgroup *read_task_memcg(struct task_struct *task)
{
	int memory_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	struct cgroup_subsys_state *css = NULL;
	struct css_set *cgroups = BPF_CORE_READ(task, cgroups);

	if (!cgroups || !bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id))
		return NULL;
	bpf_core_read(&css, sizeof(css), &cgroups->subsys[memory_id]);
	if (!css)
		return NULL;
	return (void *)css - bpf_core_field_offset(struct mem_cgroup, css);
}

static __always_inline struct mem_cgroup *read_memcg_parent(struct mem_cgroup *memcg)
{
	struct cgroup_subsys_state *parent = BPF_CORE_READ(memcg, css.parent);

	return parent ? (void *)parent - bpf_core_field_offset(struct mem_cgroup, css) : NULL;
}

static __always_inline struct kernfs_node *read_memcg_kn(struct mem_cgroup *memcg)
{
	return BPF_CORE_READ(memcg, css.cgroup, kn);
}

static __always_inline __u32 read_memcg_level(struct mem_cgroup *memcg)
{
	return BPF_CORE_READ(memcg, css.cgroup, level);
}

static __always_inline __u64 read_memcg_usage(struct mem_cgroup *memcg)
{
	long pages = BPF_CORE_READ(memcg, memory.usage.counter);

	return pages > 0 ? pages : 0;
}

static __always_inline __u64 read_memcg_max(struct mem_cgroup *memcg)
{
	return BPF_CORE_READ(memcg, memory.max);
}

static __always_inline bool read_memcg_oom_group(struct mem_cgroup *memcg)
{
	return BPF_CORE_READ(memcg, oom_group);
}

static __always_inline __u64 read_task_start_boottime(struct task_struct *task)
{
	return BPF_CORE_READ(task, start_boottime);
}

static __always_inline long read_memcg_event(struct mem_cgroup *memcg, int event)
{
	long count = 0;

	bpf_core_read(&count, sizeof(count), &memcg->memory_events[event].counter);
	return count;
}

static __always_inline bool read_memcg_events(struct mem_cgroup *memcg, __u64 *events)
{
	events[0] = read_memcg_event(memcg, bpf_core_enum_value(enum memcg_memory_event, MEMCG_LOW));
	events[1] = read_memcg_event(memcg, bpf_core_enum_value(enum memcg_memory_event, MEMCG_HIGH));
	events[2] = read_memcg_event(memcg, bpf_core_enum_value(enum memcg_memory_event, MEMCG_MAX));
	events[3] = read_memcg_event(memcg, bpf_core_enum_value(enum memcg_memory_event, MEMCG_OOM));
	events[4] = read_memcg_event(memcg, bpf_core_enum_value(enum memcg_memory_event, MEMCG_OOM_KILL));
	if (!bpf_core_enum_value_exists(enum memcg_memory_event, MEMCG_OOM_GROUP_KILL))
		return false;
	events[5] = read_memcg_event(memcg, bpf_core_enum_value(enum memcg_memory_event, MEMCG_OOM_GROUP_KILL));
	return true;
}

static __always_inline bool read_memcg_psi(struct mem_cgroup *memcg, __u32 *some, __u32 *full)
{
	struct cgroup *cgroup = BPF_CORE_READ(memcg, css.cgroup);
	struct psi_group *psi;
	unsigned long avg = 0;

	if (!cgroup)
		return false;
	if (bpf_core_field_exists(cgroup->psi))
		psi = BPF_CORE_READ(cgroup, psi);	/* 6.1+: a pointer */
	else if (bpf_core_field_exists(((struct cgroup___psi_embedded *)cgroup)->psi))
		psi = (void *)cgroup + bpf_core_field_offset(struct cgroup___psi_embedded, psi);
	else
		return false;
	if (!psi)
		return false;
	if (bpf_core_read(&avg, sizeof(avg), &psi->avg[bpf_core_enum_value(enum psi_states, PSI_MEM_SOME) * 3]))
		return false;
	*some = avg;
	if (bpf_core_read(&avg, sizeof(avg), &psi->avg[bpf_core_enum_value(enum psi_states, PSI_MEM_FULL) * 3]))
		return false;
	*full = avg;
	return true;
}

/* --- Maps and output ------------------------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Staging record for the perf-buffer path. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct oom_kill_record);
} heap SEC(".maps");

/* Records that found no room, by kind (OOM_DROPPED_*). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} dropped_kills SEC(".maps");

/* oom_kill_process facts, by trigger tid, for the hooks that see the victim's task. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct oom_control_info);
} oom_controls SEC(".maps");

/* Processes reported, so that each is reported once (see newly_killed). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct oom_reported_key);
	__type(value, __u8);
} reported_kills SEC(".maps");

/* The names (comm) of user-space memory killers, set by user space after load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, char[OOM_COMM_LEN]);
	__type(value, __u8);
} memory_killers SEC(".maps");

static __always_inline bool is_memory_killer(const char *comm)
{
	return bpf_map_lookup_elem(&memory_killers, comm) != NULL;
}

static __always_inline bool remember_reported(struct oom_reported_key *key)
{
	__u8 one = 1;

	return bpf_map_update_elem(&reported_kills, key, &one, BPF_NOEXIST) == 0;
}

/* --- Output ----------------------------------------------------------------- */


static __always_inline void count_drop(__u32 kind)
{
	__u64 *dropped = bpf_map_lookup_elem(&dropped_kills, &kind);

	if (dropped)
		__sync_fetch_and_add(dropped, 1);
}

static __always_inline struct oom_kill_record *record_reserve(__u32 kind)
{
	__u32 zero = 0;
	struct oom_kill_record *r;

	if (use_ringbuf)
		r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	else
		r = bpf_map_lookup_elem(&heap, &zero);
	if (!r && use_ringbuf)
		count_drop(kind);
	return r;
}

static __always_inline void record_discard(struct oom_kill_record *r)
{
	if (use_ringbuf)
		bpf_ringbuf_discard(r, 0);
}

static __always_inline void record_submit(void *ctx, struct oom_kill_record *r)
{
	if (use_ringbuf)
		bpf_ringbuf_submit(r, 0);
	else if (bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, r, sizeof(*r)))
		count_drop(record_kind(r));	/* the perf ring was full */
}

/* The oom_kill_process kprobe's facts about the OOM the current task triggered, if it left them. */
static __always_inline struct oom_control_info *oom_control_of_trigger(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	return bpf_map_lookup_elem(&oom_controls, &tid);
}

#include "oom_kill_fill.h"

/* --- Hooks ----------------------------------------------------------------- */

SEC("tp_btf/mark_victim")
int BPF_PROG(mark_victim_btf, struct task_struct *task, uid_t uid)
{
	if (newly_killed(task, true))
		report_kill(ctx, task, OOM_HOOK_TP_BTF, oom_control_of_trigger());
	return 0;
}

SEC("kprobe/__oom_kill_process")
int BPF_KPROBE(oom_kill_victim, struct task_struct *victim)
{
	/* The kernel kills only a victim with memory left; SIGKILL is sent after this point. */
	if (BPF_CORE_READ(victim, mm) && newly_killed(victim, false))
		report_kill(ctx, victim, OOM_HOOK_KILL_KPROBE, oom_control_of_trigger());
	return 0;
}

SEC("kprobe/oom_kill_process")
int BPF_KPROBE(oom_kill_process, struct oom_control *oc)
{
	struct task_struct *victim = BPF_CORE_READ(oc, chosen);
	struct oom_control_info info = {};

	if (!victim)
		return 0;
	read_oom_control(&info, (struct mem_cgroup *)BPF_CORE_READ(oc, memcg), BPF_CORE_READ(oc, totalpages),
			 BPF_CORE_READ(oc, chosen_points), BPF_CORE_READ(victim, tgid));
	if (!kprobe_writes_records) {
		__u32 tid = (__u32)bpf_get_current_pid_tgid();

		bpf_map_update_elem(&oom_controls, &tid, &info, BPF_ANY);
	} else if (newly_killed(victim, false)) {
		report_kill(ctx, victim, OOM_HOOK_KPROBE, &info);
	}
	return 0;
}

SEC("tp_btf/signal_generate")
int BPF_PROG(signal_generate_btf, int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
	     int result)
{
	if (kill_signal_sent(sig, info, result) && kill_to_report(task, sig))
		report_signal(ctx, task, sig, OOM_HOOK_SIGNAL);
	return 0;
}

SEC("tracepoint/oom/mark_victim")
int mark_victim_tracepoint(struct trace_event_raw_mark_victim *args)
{
	struct oom_kill_record *r;

	r = record_reserve(OOM_DROPPED_KERNEL);
	if (!r)
		return 0;
	record_init(r, OOM_HOOK_TRACEPOINT);
	set_victim_thread(r, BPF_CORE_READ(args, pid));
	/* A dying process marked while it allocates is the trigger: its task is known, and may be
	 * one already reported. */
	if (r->victim_tid == r->trigger_tid &&
	    !newly_killed((struct task_struct *)bpf_get_current_task(), true)) {
		record_discard(r);
		return 0;
	}
	if (bpf_core_field_exists(args->total_vm)) {
		__u32 comm_loc = BPF_CORE_READ(args, __data_loc_comm);

		bpf_probe_read_kernel_str(r->victim_comm, sizeof(r->victim_comm),
					  (void *)args + (comm_loc & 0xffff));
		r->victim_uid = BPF_CORE_READ(args, uid);
		r->oom_score_adj = BPF_CORE_READ(args, oom_score_adj);
		r->flags |= OOM_F_VICTIM_TASK;
		/* The tracepoint reports memory in kB already. */
		r->total_vm_kb = BPF_CORE_READ(args, total_vm);
		r->anon_rss_kb = BPF_CORE_READ(args, anon_rss);
		r->file_rss_kb = BPF_CORE_READ(args, file_rss);
		r->shmem_rss_kb = BPF_CORE_READ(args, shmem_rss);
		r->pgtables_kb = BPF_CORE_READ(args, pgtables);
		r->flags |= OOM_F_MEMORY;
	}
	fill_kernel_stack(args, r);
	record_submit(args, r);
	return 0;
}
