// SPDX-License-Identifier: GPL-2.0
/*
 * The limit for the start-up benchmark: the least a C program does to get the
 * same CO-RE object running: open, load, attach tp_btf/mark_victim, and a ring
 * buffer consumer, through libbpf. Prints {"ms": ..., "hwm_kb": ...}.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <bpf/libbpf.h>

static int on_record(void *ctx, void *data, size_t size)
{
	return 0;
}

static long status_kb(const char *field)
{
	char line[256];
	long kb = -1;
	FILE *f = fopen("/proc/self/status", "r");

	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, field, strlen(field)))
			sscanf(line + strlen(field) + 1, "%ld", &kb);
	if (f)
		fclose(f);
	return kb;
}

int main(int argc, char **argv)
{
	struct timespec t0, t1;
	struct bpf_object *obj;
	struct bpf_link *link;
	struct ring_buffer *rb;
	long hwm_before = status_kb("VmHWM");

	if (argc < 2)
		return 2;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	obj = bpf_object__open_file(argv[1], NULL);
	if (!obj)
		return 1;
	bpf_program__set_autoload(bpf_object__find_program_by_name(obj, "oom_kill_process"), false);
	bpf_program__set_autoload(bpf_object__find_program_by_name(obj, "mark_victim_tracepoint"), false);
	bpf_map__set_max_entries(bpf_object__find_map_by_name(obj, "events"), 1 << 20);
	if (bpf_object__load(obj))
		return 1;
	link = bpf_program__attach(bpf_object__find_program_by_name(obj, "mark_victim_btf"));
	if (!link)
		return 1;
	rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "events")), on_record, NULL, NULL);
	if (!rb)
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("{\"ms\": %.3f, \"hwm_before_kb\": %ld, \"hwm_kb\": %ld, \"rss_kb\": %ld}\n",
	       (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6, hwm_before,
	       status_kb("VmHWM"), status_kb("VmRSS"));
	ring_buffer__free(rb);
	bpf_link__destroy(link);
	bpf_object__close(obj);
	return 0;
}
