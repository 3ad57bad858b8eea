/*
 * runstat - run a command, report its wall time and peak RSS (a stand-in for GNU `/usr/bin/time -v`,
 * which the nested-KVM guest's busybox userland lacks).
 *
 * Usage:  runstat OUTFILE COMMAND [ARG...]
 *
 * COMMAND's stdin is /dev/null, its stdout and stderr go to OUTFILE (truncated). When it ends, one line
 * goes to runstat's stdout:
 *   rc=.. wall_ns=.. user_ns=.. sys_ns=.. maxrss_kb=..
 * wall_ns runs from just before fork() to wait4() returning (process start -> guest finished -> process
 * reaped); user/sys/maxrss are the child's rusage from wait4() (maxrss_kb: peak resident set, KiB).
 * rc is the child's exit status (128+N if killed by signal N). runstat itself exits 0 unless it could
 * not run the command (then 127, with a message on stderr).
 *
 * Build: gcc -O2 -Wall -Werror -static -o runstat runstat.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long ns_of(struct timeval tv) { return tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL; }

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s OUTFILE COMMAND [ARG...]\n", argv[0]);
        return 2;
    }
    int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) {
        fprintf(stderr, "runstat: open(%s): %s\n", argv[1], strerror(errno));
        return 127;
    }
    int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (in < 0) {
        fprintf(stderr, "runstat: open(/dev/null): %s\n", strerror(errno));
        return 127;
    }
    fflush(stdout);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "runstat: fork: %s\n", strerror(errno));
        return 127;
    }
    if (pid == 0) {
        if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0)
            _exit(127);
        execvp(argv[2], argv + 2);
        dprintf(2, "runstat: exec %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    int status;
    struct rusage ru;
    pid_t r;
    while ((r = wait4(pid, &status, 0, &ru)) < 0 && errno == EINTR)
        ;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (r < 0) {
        fprintf(stderr, "runstat: wait4: %s\n", strerror(errno));
        return 127;
    }
    int rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    long long wall = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    printf("rc=%d wall_ns=%lld user_ns=%lld sys_ns=%lld maxrss_kb=%ld\n", rc, wall, ns_of(ru.ru_utime),
           ns_of(ru.ru_stime), ru.ru_maxrss);
    return 0;
}
