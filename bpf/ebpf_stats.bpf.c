// SPDX-License-Identifier: GPL-2.0
/*
 * eBPF stats: BPF iterators.
 *
 *  - iter/bpf_map + bpf_map_sum_elem_count() (kernel 6.6+): the number of
 *    elements of every map in one pass, from the counters the kernel keeps;
 *    the cost grows with the number of maps, not with their entries.
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

extern s64 bpf_map_sum_elem_count(const struct bpf_map *map) __ksym __weak;

SEC("iter/bpf_map")
int map_entries(struct bpf_iter__bpf_map *ctx)
{
	struct bpf_map *map = ctx->map;
	struct map_entries_record rec = {};

	if (!map)
		return 0;
	rec.map_id = map->id;
	rec.entries = bpf_map_sum_elem_count(map);
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
	rec.fd = ctx->fd;
	BPF_CORE_READ_STR_INTO(&rec.comm, task, comm);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

