/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one record both sides of the OOM-kill probe read: written by the BPF
 * programs (CO-RE object and BCC variant), decoded by
 * datadog_checks/ebpf_probe/oom_kill/record.py. Fixed-size fields only; any
 * change here must be mirrored in RECORD_FIELDS there (a test compares every
 * field's offset with this struct's BTF in the compiled object).
 */
#ifndef EBPF_PROBE_OOM_KILL_H
#define EBPF_PROBE_OOM_KILL_H

#define OOM_COMM_LEN 16
/* Levels of the victim's memory cgroup path kept, leaf first. */
#define OOM_CGROUP_MAX_DEPTH 8
/* Bytes kept of each level's name (k8s/containerd scope names are ~90). */
#define OOM_CGROUP_NAME_LEN 128
/* Trigger's kernel stack frames kept: user space finds the memcg OOM path in them. */
#define OOM_STACK_DEPTH 20

/* Which hook wrote the record. */
#define OOM_HOOK_TP_BTF 1	/* tp_btf/mark_victim, task argument */
#define OOM_HOOK_KPROBE 2	/* kprobe/oom_kill_process */
#define OOM_HOOK_TRACEPOINT 3	/* tracepoint/oom/mark_victim */
#define OOM_HOOK_RAW_TP 4	/* raw_tracepoint/mark_victim (BCC) */
#define OOM_HOOK_KILL_KPROBE 5	/* kprobe/__oom_kill_process: each kill, group members too */
#define OOM_HOOK_SIGNAL 6	/* tp_btf/signal_generate: a kill signal sent from user space */
#define OOM_HOOK_SIGNAL_RAW_TP 7	/* raw_tracepoint/signal_generate (BCC) */

/* dropped_kills' slots: records that found no room, by kind. */
#define OOM_DROPPED_KERNEL 0	/* the kernel's OOM kills */
#define OOM_DROPPED_SIGNAL 1	/* kill signals from user space */

/* memory.events entries kept: low, high, max, oom, oom_kill, oom_group_kill. */
#define OOM_MEMCG_EVENTS 6

/* record.flags */
#define OOM_F_MEMCG (1U << 0)		/* a memory cgroup, not the system, was out of memory */
#define OOM_F_CONSTRAINT_KNOWN (1U << 1)	/* OOM_F_MEMCG is meaningful (else see kernel_stack) */
#define OOM_F_VICTIM_TASK (1U << 2)	/* comm, uid, oom_score_adj filled */
#define OOM_F_MEMORY (1U << 3)		/* the *_kb memory fields filled */
#define OOM_F_OOM_CONTROL (1U << 4)	/* oom_domain_pages, badness_points filled */
#define OOM_F_CGROUP (1U << 5)		/* cgroup_id, cgroup_names filled */
#define OOM_F_CGROUP_NAME_TRUNCATED (1U << 6)	/* a level's name is longer than kept */
#define OOM_F_CHOSEN (1U << 7)		/* the victim the OOM killer chose (badness_points is its) */
#define OOM_F_CGROUP_DEPTH_TRUNCATED (1U << 8)	/* more levels above the kept ones */
#define OOM_F_VICTIM_PID_UNKNOWN (1U << 9)	/* only the victim's thread id is known */
#define OOM_F_DOMAIN (1U << 10)		/* domain_* filled: the memory cgroup that hit its limit */
#define OOM_F_DOMAIN_GUESSED (1U << 11)	/* ... found as the one left without room (no oom_control) */
#define OOM_F_PID_NS (1U << 12)		/* victim_ns_pid, pid_ns_level filled */
#define OOM_F_PARENT (1U << 13)		/* parent_pid, parent_ns_pid, parent_comm filled */
#define OOM_F_OLDEST_CHILD (1U << 14)	/* the victim is its parent's oldest living child */
#define OOM_F_MEMCG_STATE (1U << 15)	/* signal hooks: domain_* are the victim's memory cgroup's, memcg_events filled */
#define OOM_F_PSI (1U << 16)		/* psi_memory_*_avg10 filled */
#define OOM_F_OOM_GROUP_KILL_EVENT (1U << 17)	/* memcg_events' oom_group_kill is the kernel's (5.17+) */

struct oom_kill_record {
	__u64 timestamp_ns;	/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 total_vm_kb;
	__u64 anon_rss_kb;
	__u64 file_rss_kb;
	__u64 shmem_rss_kb;
	__u64 pgtables_kb;
	__u64 oom_domain_pages;	/* oom_control.totalpages: size of the OOM domain */
	__s64 badness_points;	/* oom_control.chosen_points: not /proc/PID/oom_score */
	__u64 cgroup_id;	/* kernfs id of the victim's memory cgroup */
	__u64 domain_usage_pages;	/* the OOM domain's memory use and limit when the victim was chosen */
	__u64 domain_limit_pages;
	__u64 victim_start_time;	/* signal hooks: the victim's start_boottime, ns (tells a reused pid apart) */
	__u64 memcg_events[OOM_MEMCG_EVENTS];	/* signal hooks: the victim's memory.events */
	__u32 victim_pid;	/* tgid */
	__u32 victim_tid;	/* the thread the kernel marked */
	__u32 victim_uid;
	__u32 trigger_pid;	/* the task running the hook: the allocation that failed, or the signal's sender */
	__u32 trigger_tid;
	__u32 flags;
	__u32 victim_ns_pid;	/* its pid in its own pid namespace: 1 is a container's main process */
	__u32 parent_pid;	/* the victim's parent (its reaper, once the parent has exited) */
	__u32 parent_ns_pid;	/* the parent's pid in the victim's pid namespace; 0: outside it */
	__u32 psi_memory_some_avg10;	/* signal hooks: the victim cgroup's memory pressure, FIXED_1 (2048) = 100% */
	__u32 psi_memory_full_avg10;
	__s16 oom_score_adj;
	__u8 hook;
	__u8 cgroup_depth;	/* levels filled in cgroup_names */
	__u8 cgroup_level;	/* the victim's memory cgroup's depth below the hierarchy's root */
	__u8 domain_level;	/* the OOM domain's: the victim's cgroup or one of its ancestors */
	__u8 group_level;	/* the memory.oom.group cgroup's (the group killed with it); 0: none */
	__u8 pid_ns_level;	/* 0: the host's pid namespace */
	__u8 signal;	/* signal hooks: SIGKILL or SIGTERM */
	__u8 _pad[7];	/* keeps kernel_stack 8-byte aligned */
	__u32 kernel_stack_depth;	/* frames filled in kernel_stack */
	char victim_comm[OOM_COMM_LEN];
	char trigger_comm[OOM_COMM_LEN];
	char parent_comm[OOM_COMM_LEN];
	__u64 kernel_stack[OOM_STACK_DEPTH];	/* trigger's, innermost first */
	char cgroup_names[OOM_CGROUP_MAX_DEPTH][OOM_CGROUP_NAME_LEN]; /* leaf first */
};

/* The dropped_kills slot a record counts in when it finds no room. */
static inline __attribute__((always_inline)) int record_kind(const struct oom_kill_record *r)
{
	return r->hook == OOM_HOOK_SIGNAL || r->hook == OOM_HOOK_SIGNAL_RAW_TP ? OOM_DROPPED_SIGNAL : OOM_DROPPED_KERNEL;
}

/* What kprobe/oom_kill_process leaves for the hooks that see the victim task, by trigger tid. */
struct oom_control_info {
	__u64 oom_domain_pages;
	__s64 badness_points;
	__u64 domain_usage_pages;
	__u64 domain_limit_pages;
	__u32 victim_pid;	/* the chosen one; the other members of a group kill come after it */
	__u8 memcg;
	__u8 domain_level;
	__u8 _pad[2];
};

/* A process already reported: its tgid, and its start time, which tells a reused tgid apart. */
struct oom_reported_key {
	__u32 tgid;
	__u32 _pad;
	__u64 start_time;
};

#endif /* EBPF_PROBE_OOM_KILL_H */
