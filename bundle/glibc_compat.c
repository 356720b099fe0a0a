// SPDX-License-Identifier: BSD-3-Clause
// (C) ebpf_probe authors
//
// Linked into the bundled libbpf.so.1 so that it runs on glibc 2.28 (RHEL 8, Debian 10) although
// it is built against Debian 12's glibc 2.36. Since glibc 2.33 the stat family are real functions
// (versioned GLIBC_2.33); before, they were inline wrappers around __xstat. These hidden
// definitions take their place inside the library, calling the kernel directly: glibc's struct
// stat is the kernel's on x86-64 and arm64, which is what glibc itself hands the kernel there.
// tests/test_bundle.py measures the GLIBC_x.y versions the library ends up needing.

#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define HIDDEN __attribute__((visibility("hidden")))

HIDDEN int fstatat(int dirfd, const char *path, struct stat *buf, int flags)
{
	return syscall(SYS_newfstatat, dirfd, path, buf, flags);
}

HIDDEN int stat(const char *path, struct stat *buf)
{
	return fstatat(AT_FDCWD, path, buf, 0);
}

HIDDEN int lstat(const char *path, struct stat *buf)
{
	return fstatat(AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW);
}

HIDDEN int fstat(int fd, struct stat *buf)
{
	return syscall(SYS_fstat, fd, buf);
}
