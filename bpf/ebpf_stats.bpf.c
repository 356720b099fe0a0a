// SPDX-License-Identifier: GPL-2.0
/*
 * eBPF stats: BPF iterators.
 *
 *  - iter/bpf_map: every map's bpf_map_info fields in one pass, with no file
 *    descriptor per map; list_maps_count adds the number of elements from
 *    the counters the kernel keeps (bpf_map_sum_elem_count(), 6.6+): the cost
 *    grows with the number of maps, not with their entries.
 *  - iter/bpf_prog: every program's bpf_prog_info fields in one pass, run-time
 *    counters summed over CPUs as the kernel does (bpf_prog_get_stats()).
 *  - iter/bpf_map_elem, where the kfunc is missing (5.9 to 6.5): attached to
 *    one hash map at a time, it walks its elements in the kernel and writes
 *    their number. Loaded once, attached to each map in turn.
 *  - iter/task_file: every file descriptor of every process that refers to a
 *    BPF map, program or link, i.e. who owns what. The kernel's bpf_map_fops
 *    symbols are not always visible (CONFIG_KALLSYMS_ALL=n), so the kind of a
 *    file is read from its anonymous inode's name: "bpf-map", "bpf-prog",
 *    "bpf_link".
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "ebpf_stats.h"

char LICENSE[] SEC("license") = "GPL";

/* Never read: they put the records' layout in the object's BTF, which the user side's is tested against. */
struct prog_record prog_record_layout;
struct map_record map_record_layout;

extern s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym __weak;

/* Set before load. nr_cpus: possible CPUs (0..nr_cpus-1), 0 where run-time
 * counters cannot be read here (no bpf_map_lookup_percpu_elem before 5.19). */
const volatile __u32 nr_cpus = 0;

#define MAX_CPUS 1024

/* A ring buffer's bytes written and not yet consumed (records being written included). */
static __always_inline s64 ring_used(struct bpf_map *map)
{
	struct bpf_ringbuf_map *ring_map;
	struct bpf_ringbuf *rb;

	if ((map->map_type != MAP_TYPE_RINGBUF && map->map_type != MAP_TYPE_USER_RINGBUF) ||
	    !bpf_core_type_exists(struct bpf_ringbuf_map))
		return NOT_COUNTED;
	ring_map = (void *)map - bpf_core_field_offset(struct bpf_ringbuf_map, map);
	rb = BPF_CORE_READ(ring_map, rb);
	if (!rb)
		return NOT_COUNTED;
	return BPF_CORE_READ(rb, producer_pos) - BPF_CORE_READ(rb, consumer_pos);
}

/* The memory cgroup a map's memory is charged to (its creator's, 5.11+). */
static __always_inline __u32 read_map_memcg(struct bpf_map *map, __u64 *id)
{
	struct mem_cgroup *memcg = NULL;

	if (bpf_core_field_exists(map->objcg)) {
		struct obj_cgroup *objcg = BPF_CORE_READ(map, objcg);

		if (objcg)
			memcg = BPF_CORE_READ(objcg, memcg);
	} else if (bpf_core_field_exists(((struct bpf_map___memcg *)map)->memcg)) {
		memcg = BPF_CORE_READ((struct bpf_map___memcg *)map, memcg);
	} else {
		return 0;
	}
	*id = memcg ? BPF_CORE_READ(memcg, css.cgroup, kn, id) : 0;
	return MAP_MEMCG_KNOWN;
}

static __always_inline void write_map(struct seq_file *seq, struct bpf_map *map, s64 entries)
{
	struct map_record rec = {};

	rec.id = map->id;
	rec.type = map->map_type;
	rec.key_size = map->key_size;
	rec.value_size = map->value_size;
	rec.max_entries = map->max_entries;
	rec.flags = map->map_flags;
	BPF_CORE_READ_INTO(&rec.name, map, name);
	rec.refcnt = map->refcnt.counter;
	rec.entries = entries;
	rec.ring_used = ring_used(map);
	rec.map_flags = read_map_memcg(map, &rec.memcg_id);
	bpf_seq_write(seq, &rec, sizeof(rec));
}

/* Loaded where the kernel has bpf_map_sum_elem_count() (6.6+). */
SEC("iter/bpf_map")
int list_maps_count(struct bpf_iter__bpf_map *ctx)
{
	struct bpf_map *map = ctx->map;

	if (!map)
		return 0;
	write_map(ctx->meta->seq, map, bpf_map_sum_elem_count(map));
	return 0;
}

SEC("iter/bpf_map")
int list_maps(struct bpf_iter__bpf_map *ctx)
{
	struct bpf_map *map = ctx->map;

	if (!map)
		return 0;
	write_map(ctx->meta->seq, map, NOT_COUNTED);
	return 0;
}

/*
 * Run-time counters are per CPU: prog->stats is a per-CPU address, and CPU n's
 * copy is at that address plus CPU n's per-CPU offset. Those offsets
 * (__per_cpu_offset) are not visible to BPF without CONFIG_KALLSYMS_ALL, so
 * they are measured once on a per-CPU array of our own: its element's per-CPU
 * address (bpf_array.pptrs[0]) against where bpf_map_lookup_percpu_elem()
 * finds it on each CPU.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} cpu_anchor SEC(".maps");

__u64 cpu_offsets[MAX_CPUS];
__u32 cpu_offsets_known = 0;

/* A pointer's value as a number: the verifier refuses arithmetic on a pointer
 * to a map, so it is copied out through the stack. */
static __always_inline __u64 address_of(void *pointer)
{
	__u64 address = 0;

	bpf_probe_read_kernel(&address, sizeof(address), &pointer);
	return address;
}

static __always_inline int find_cpu_offsets(void)
{
	__u64 anchor = 0;
	__u32 zero = 0, cpu;

	if (cpu_offsets_known)
		return 0;
	bpf_probe_read_kernel(&anchor, sizeof(anchor),
			      (void *)(address_of(&cpu_anchor) + bpf_core_field_offset(struct bpf_array, pptrs)));
	for (cpu = 0; cpu < MAX_CPUS && cpu < nr_cpus; cpu++) {
		void *value = bpf_map_lookup_percpu_elem(&cpu_anchor, &zero, cpu);

		if (!value)
			return -1;
		cpu_offsets[cpu] = address_of(value) - anchor;
	}
	cpu_offsets_known = 1;
	return 0;
}

struct run_stats {
	__u64 cnt;
	__u64 nsecs;
	__u64 misses;
};

/* bpf_prog_get_stats(): the counters of every possible CPU, summed. */
static __always_inline int read_run_stats(struct bpf_prog *prog, struct run_stats *sum)
{
	__u64 stats, value;
	__u32 cpu;

	if (!nr_cpus || !bpf_core_field_exists(prog->stats) || find_cpu_offsets())
		return 0;
	stats = (__u64)BPF_CORE_READ(prog, stats);
	if (!stats)
		return 0;
	for (cpu = 0; cpu < MAX_CPUS && cpu < nr_cpus; cpu++) {
		__u64 here = stats + cpu_offsets[cpu];

		value = 0;
		bpf_probe_read_kernel(&value, sizeof(value), (void *)(here + bpf_core_field_offset(struct bpf_prog_stats, cnt)));
		sum->cnt += value;
		value = 0;
		bpf_probe_read_kernel(&value, sizeof(value), (void *)(here + bpf_core_field_offset(struct bpf_prog_stats, nsecs)));
		sum->nsecs += value;
		if (bpf_core_field_exists(struct bpf_prog_stats, misses)) {
			value = 0;
			bpf_probe_read_kernel(&value, sizeof(value),
					      (void *)(here + bpf_core_field_offset(struct bpf_prog_stats, misses)));
			sum->misses += value;
		}
	}
	return PROG_RUN_STATS;
}

SEC("iter/bpf_prog")
int list_programs(struct bpf_iter__bpf_prog *ctx)
{
	struct bpf_prog *prog = ctx->prog;
	struct seq_file *seq = ctx->meta->seq;
	struct prog_record rec = {};
	struct run_stats stats = {};
	struct bpf_prog_aux *aux;
	struct bpf_map **used_maps;
	__u32 i;

	if (!prog)
		return 0;
	aux = prog->aux;
	rec.id = aux->id;
	rec.type = prog->type;
	BPF_CORE_READ_INTO(&rec.tag, prog, tag);
	BPF_CORE_READ_INTO(&rec.name, aux, name);
	rec.insns = prog->len;
	rec.jited_len = prog->jited_len;
	rec.func_cnt = aux->func_cnt;
	rec.pages = prog->pages;
	if (bpf_core_field_exists(aux->verified_insns)) {
		rec.verified_insns = aux->verified_insns;
		rec.flags |= PROG_VERIFIED_INSNS;
	}
	rec.refcnt = aux->refcnt.counter;
	if (aux->offload || (bpf_core_field_exists(aux->dev_bound) && aux->dev_bound))
		rec.flags |= PROG_DEVICE;
	rec.flags |= read_run_stats(prog, &stats);
	rec.run_time_ns = stats.nsecs;
	rec.run_cnt = stats.cnt;
	rec.recursion_misses = stats.misses;
	rec.nr_map_ids = aux->used_map_cnt;
	if (rec.nr_map_ids > MAX_MAP_IDS) {
		rec.nr_map_ids = MAX_MAP_IDS;
		rec.flags |= PROG_MAPS_CUT;
	}
	bpf_seq_write(seq, &rec, sizeof(rec));
	used_maps = BPF_CORE_READ(aux, used_maps);
	for (i = 0; i < MAX_MAP_IDS && i < rec.nr_map_ids; i++) {
		struct bpf_map *map = NULL;
		__u32 map_id;

		bpf_probe_read_kernel(&map, sizeof(map), &used_maps[i]);
		map_id = BPF_CORE_READ(map, id);
		bpf_seq_write(seq, &map_id, sizeof(map_id));
	}
	return 0;
}

/* Only the counters, for the reads around each statistics window. */
SEC("iter/bpf_prog")
int program_stats(struct bpf_iter__bpf_prog *ctx)
{
	struct bpf_prog *prog = ctx->prog;
	struct prog_run_record rec = {};
	struct run_stats stats = {};

	if (!prog)
		return 0;
	rec.id = prog->aux->id;
	rec.flags = read_run_stats(prog, &stats);
	rec.run_time_ns = stats.nsecs;
	rec.run_cnt = stats.cnt;
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

/* Elements seen by the current walk: one walk at a time (user space holds a lock). */
__u64 elements = 0;

SEC("iter/bpf_map_elem")
int map_elements(struct bpf_iter__bpf_map_elem *ctx)
{
	if (ctx->key) {
		elements++;
		return 0;
	}
	/* The last call, after the last element, has no element. */
	bpf_seq_write(ctx->meta->seq, &elements, sizeof(elements));
	elements = 0;
	return 0;
}

/* The first bytes of an anonymous inode's name tell a BPF object's kind. */
static __always_inline __u32 bpf_file_kind(struct file *file)
{
	char name[9] = {};

	bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ(file, f_path.dentry, d_name.name));
	if (name[0] != 'b' || name[1] != 'p' || name[2] != 'f')
		return 0;
	if (name[3] == '-' && name[4] == 'm' && name[5] == 'a' && name[6] == 'p' && name[7] == 0)
		return OWNED_MAP;
	if (name[3] == '-' && name[4] == 'p' && name[5] == 'r' && name[6] == 'o' && name[7] == 'g' && name[8] == 0)
		return OWNED_PROG;
	if (name[3] == '_' && name[4] == 'l' && name[5] == 'i' && name[6] == 'n' && name[7] == 'k' && name[8] == 0)
		return OWNED_LINK;
	return 0;
}

/* A process's memory cgroup: the kernfs id of its memory controller's cgroup. */
static __always_inline __u64 task_memcg_id(struct task_struct *task)
{
	int memory_id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	struct cgroup_subsys_state *css = NULL;
	struct css_set *cgroups = BPF_CORE_READ(task, cgroups);

	if (!cgroups || !bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id))
		return 0;
	bpf_core_read(&css, sizeof(css), &cgroups->subsys[memory_id]);
	if (!css)
		return 0;
	return BPF_CORE_READ(css, cgroup, kn, id);
}

SEC("iter/task_file")
int bpf_owners(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct owner_record rec = {};
	void *object;

	if (!task || !file)
		return 0;
	rec.kind = bpf_file_kind(file);
	if (!rec.kind)
		return 0;
	object = BPF_CORE_READ(file, private_data);
	if (!object)
		return 0;
	if (rec.kind == OWNED_MAP) {
		rec.id = BPF_CORE_READ((struct bpf_map *)object, id);
	} else if (rec.kind == OWNED_PROG) {
		rec.id = BPF_CORE_READ((struct bpf_prog *)object, aux, id);
	} else {
		rec.id = BPF_CORE_READ((struct bpf_link *)object, id);
		rec.link_prog_id = BPF_CORE_READ((struct bpf_link *)object, prog, aux, id);
	}
	rec.tgid = BPF_CORE_READ(task, tgid);
	rec.reader = rec.tgid == bpf_get_current_pid_tgid() >> 32;
	rec.fd = ctx->fd;
	BPF_CORE_READ_STR_INTO(&rec.comm, task, comm);
	rec.memcg_id = task_memcg_id(task);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

