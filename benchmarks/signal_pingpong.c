// Two processes pass SIGUSR1 back and forth for a while; prints the signals sent per second of
// wall time and per second of the two processes' CPU time (steadier on a shared machine: waits
// for a CPU are not in it). A signal-heavy workload for the kill signals' hook, which sees every
// signal on the host.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double since(const struct timespec *start)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - start->tv_sec) + (now.tv_nsec - start->tv_nsec) / 1e9;
}

static double cpu_seconds(int who)
{
	struct rusage usage;

	getrusage(who, &usage);
	return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
	       (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 2.0, elapsed;
	sigset_t usr1;
	pid_t parent = getpid(), child;
	struct timespec start;
	long sent = 0;
	int sig;

	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigprocmask(SIG_BLOCK, &usr1, NULL);	/* taken with sigwait: no handler's cost in the figure */
	child = fork();
	if (child == 0) {
		for (;;) {
			sigwait(&usr1, &sig);
			kill(parent, SIGUSR1);
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &start);
	do {
		for (int i = 0; i < 1000; i++) {
			kill(child, SIGUSR1);
			sigwait(&usr1, &sig);
		}
		sent += 2000;
	} while ((elapsed = since(&start)) < seconds);
	kill(child, SIGKILL);
	waitpid(child, NULL, 0);
	printf("%.0f %.0f\n", sent / elapsed, sent / (cpu_seconds(RUSAGE_SELF) + cpu_seconds(RUSAGE_CHILDREN)));
	return 0;
}
