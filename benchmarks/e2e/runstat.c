/*
 * runstat - run a command, report its wall time and peak RSS (a stand-in for GNU `/usr/bin/time -v`,
 * which the nested-KVM guest's busybox userland lacks).
 *
 * Usage:  runstat [-t SECONDS] [-m MARKER]... OUTFILE COMMAND [ARG...]
 *
 * COMMAND's stdin is /dev/null, its stdout and stderr go to OUTFILE (truncated). When it ends, one line
 * goes to runstat's stdout:
 *   rc=.. wall_ns=.. user_ns=.. sys_ns=.. maxrss_kb=..
 * wall_ns runs from just before fork() to wait4() returning (process start -> guest finished -> process
 * reaped); user/sys/maxrss are the child's rusage from wait4() (maxrss_kb: peak resident set, KiB).
 * rc is the child's exit status (128+N if killed by signal N). runstat itself exits 0 unless it could
 * not run the command (then 127, with a message on stderr).
 *
 * With -m (up to 8), COMMAND's stdout and stderr go through a pipe that runstat reads and copies to OUTFILE,
 * and the line also gets first_byte_ns=.. (fork -> the first output byte read) and mark1_ns=.. mark2_ns=.. (fork
 * -> the read that completed the first line containing the i-th MARKER; -1 if never seen). Markers are
 * matched within one line (lines longer than 4 KiB are matched in pieces).
 * With -t, the child is killed (SIGKILL) after SECONDS; rc is then 137.
 *
 * Build: gcc -O2 -Wall -Werror -static -o runstat runstat.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long ns_of(struct timeval tv) { return tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL; }

static pid_t child;
static void on_alarm(int sig) { (void)sig; if (child > 0) kill(child, SIGKILL); }
static long long since(struct timespec t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec);
}

int main(int argc, char **argv)
{
    const char *marks[8];
    long long mark_ns[8];
    int nmarks = 0, timeout = 0, opt;
    while ((opt = getopt(argc, argv, "+m:t:")) != -1) {
        if (opt == 'm' && nmarks < 8) { marks[nmarks] = optarg; mark_ns[nmarks++] = -1; }
        else if (opt == 't') timeout = atoi(optarg);
        else { fprintf(stderr, "runstat: bad option\n"); return 2; }
    }
    argc -= optind - 1;
    argv += optind - 1;
    if (argc < 3) {
        fprintf(stderr, "usage: runstat [-t SECONDS] [-m MARKER]... OUTFILE COMMAND [ARG...]\n");
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
    int pfd[2] = { -1, -1 };
    if (nmarks > 0 && pipe2(pfd, O_CLOEXEC) < 0) {
        fprintf(stderr, "runstat: pipe: %s\n", strerror(errno));
        return 127;
    }
    int sink = nmarks > 0 ? pfd[1] : out;
    fflush(stdout);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t pid = child = fork();
    if (pid < 0) {
        fprintf(stderr, "runstat: fork: %s\n", strerror(errno));
        return 127;
    }
    if (pid == 0) {
        if (dup2(in, 0) < 0 || dup2(sink, 1) < 0 || dup2(sink, 2) < 0)
            _exit(127);
        execvp(argv[2], argv + 2);
        dprintf(2, "runstat: exec %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    if (timeout > 0) {
        signal(SIGALRM, on_alarm);
        alarm(timeout);
    }
    long long first_byte_ns = -1;
    if (nmarks > 0) {
        close(pfd[1]);
        static char buf[65536], line[4097];
        size_t len = 0;
        ssize_t n;
        while ((n = read(pfd[0], buf, sizeof buf)) != 0) {
            if (n < 0) {
                if (errno == EINTR) continue;
                break;
            }
            long long now = since(t0);
            if (first_byte_ns < 0) first_byte_ns = now;
            if (write(out, buf, n) != n) { /* keep measuring */ }
            for (ssize_t i = 0; i < n; i++) {
                int eol = buf[i] == '\n';
                if (!eol && buf[i] != '\0') line[len++] = buf[i];
                if (eol || len == sizeof line - 1 || i == n - 1) {
                    line[len] = 0;
                    for (int k = 0; k < nmarks; k++)
                        if (mark_ns[k] < 0 && strstr(line, marks[k])) mark_ns[k] = now;
                    if (eol || len == sizeof line - 1) len = 0;
                }
            }
        }
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
    printf("rc=%d wall_ns=%lld user_ns=%lld sys_ns=%lld maxrss_kb=%ld", rc, wall, ns_of(ru.ru_utime),
           ns_of(ru.ru_stime), ru.ru_maxrss);
    if (nmarks > 0) printf(" first_byte_ns=%lld", first_byte_ns);
    for (int k = 0; k < nmarks; k++) printf(" mark%d_ns=%lld", k + 1, mark_ns[k]);
    printf("\n");
    return 0;
}
