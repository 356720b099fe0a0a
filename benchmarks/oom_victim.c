// SPDX-License-Identifier: GPL-2.0
/*
 * The OOM burst benchmark's victim: joins the memory cgroup whose cgroup.procs
 * is argv[1], takes the name argv[2], then touches memory until the kernel's
 * OOM killer stops it. A few milliseconds per kill, unlike an interpreter.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	FILE *procs;

	if (argc < 3)
		return 2;
	procs = fopen(argv[1], "w");
	if (!procs || fprintf(procs, "%d\n", getpid()) < 0 || fclose(procs))
		return 3;
	prctl(PR_SET_NAME, argv[2], 0, 0, 0);
	for (;;) {
		char *chunk = malloc(1 << 20);

		if (!chunk)
			return 4;
		memset(chunk, 1, 1 << 20);
	}
}
