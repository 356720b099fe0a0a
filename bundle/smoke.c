// SPDX-License-Identifier: BSD-3-Clause
// (C) ebpf_probe authors
//
// Smoke test of a bundled libbpf.so.1 that needs no kernel: load it by path, parse the kernel's
// BTF, open a BPF object (libelf) and read its BTF. Built for the library's architecture and run
// natively or under qemu-user by tests/test_bundle.py.
//
//   smoke LIBBPF_SO BPF_OBJECT BTF_FILE

#include <dlfcn.h>
#include <stdio.h>

#define LOOKUP(handle, name)                                                         \
	name = dlsym(handle, #name);                                                 \
	if (!name) {                                                                 \
		fprintf(stderr, "%s not exported: %s\n", #name, dlerror());          \
		return 1;                                                            \
	}

int main(int argc, char **argv)
{
	unsigned int (*libbpf_major_version)(void);
	unsigned int (*libbpf_minor_version)(void);
	void *(*btf__parse)(const char *, void *);
	void (*btf__free)(void *);
	unsigned int (*btf__type_cnt)(const void *);
	void *(*bpf_object__open_file)(const char *, const void *);
	void (*bpf_object__close)(void *);
	void *(*bpf_object__btf)(const void *);
	void *lib, *btf, *obj;

	if (argc != 4) {
		fprintf(stderr, "usage: %s LIBBPF_SO BPF_OBJECT BTF_FILE\n", argv[0]);
		return 2;
	}
	lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
	if (!lib) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		return 1;
	}
	LOOKUP(lib, libbpf_major_version);
	LOOKUP(lib, libbpf_minor_version);
	LOOKUP(lib, btf__parse);
	LOOKUP(lib, btf__free);
	LOOKUP(lib, btf__type_cnt);
	LOOKUP(lib, bpf_object__open_file);
	LOOKUP(lib, bpf_object__close);
	LOOKUP(lib, bpf_object__btf);

	btf = btf__parse(argv[3], NULL);
	if (!btf) {
		perror("btf__parse");
		return 1;
	}
	obj = bpf_object__open_file(argv[2], NULL);
	if (!obj || !bpf_object__btf(obj)) {
		perror("bpf_object__open_file");
		return 1;
	}
	printf("libbpf %u.%u: %u BTF types, %u in the object\n", libbpf_major_version(),
	       libbpf_minor_version(), btf__type_cnt(btf), btf__type_cnt(bpf_object__btf(obj)));
	bpf_object__close(obj);
	btf__free(btf);
	return 0;
}
