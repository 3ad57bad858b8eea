/* vsock-bench - both halves of the vsock benchmark (benchmarks/e2e/run.sh --vsock).
 *
 * In the guest (static binary in its initramfs):
 *   vsock-bench serve PORT            accept one AF_VSOCK connection at a time on PORT; each starts with a 1-byte
 *                                     mode: 'p' echo every byte back (ping-pong), 's' read and discard until EOF,
 *                                     then write an 8-byte count of what was read
 * On the host, next to the VMM:
 *   vsock-bench pingpong TARGET PORT COUNT SIZE   COUNT round trips of SIZE bytes
 *   vsock-bench stream TARGET PORT MIB            MIB MiB host -> guest, timed until the guest's count arrives
 * TARGET is unix:PATH (Firecracker/Cloud Hypervisor hybrid vsock: connect to PATH, "CONNECT PORT\n", "OK ...\n")
 * or vsock:CID (the kernel's AF_VSOCK, e.g. QEMU's vhost-vsock). Prints one line:
 *   VSOCKBENCH op=pingpong size=64 count=N us=T          /  VSOCKBENCH op=stream bytes=N us=T
 * and retries the connection for up to 60 s (the guest boots meanwhile).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void die(const char *what)
{
    fprintf(stderr, "vsock-bench: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n)
{
    char *c = p;
    while (n > 0) {
        ssize_t r = read(fd, c, n);
        if (r <= 0)
            return -1;
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

/* One connection attempt; -1 when the peer is not there yet. */
static int try_connect(const char *target, unsigned port)
{
    if (strncmp(target, "unix:", 5) == 0) {
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        snprintf(a.sun_path, sizeof a.sun_path, "%s", target + 5);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            close(fd);
            return -1;
        }
        char line[64];
        int n = snprintf(line, sizeof line, "CONNECT %u\n", port);
        if (write_all(fd, line, (size_t)n) != 0) {
            close(fd);
            return -1;
        }
        /* "OK <host port>\n", byte by byte so no stream data is swallowed. */
        size_t got = 0;
        while (got < sizeof line - 1) {
            if (read(fd, line + got, 1) != 1) {
                close(fd);
                return -1; /* the guest is not listening yet: the VMM closes (RST) */
            }
            if (line[got++] == '\n')
                break;
        }
        line[got] = 0;
        if (strncmp(line, "OK ", 3) != 0) {
            close(fd);
            return -1;
        }
        return fd;
    }
    if (strncmp(target, "vsock:", 6) == 0) {
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = (unsigned)atoi(target + 6), .svm_port = port };
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0)
            die("socket(AF_VSOCK)");
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            close(fd);
            return -1;
        }
        return fd;
    }
    fprintf(stderr, "vsock-bench: TARGET is unix:PATH or vsock:CID, not %s\n", target);
    exit(2);
}

static int connect_retry(const char *target, unsigned port)
{
    uint64_t deadline = now_us() + 60u * 1000000u;
    for (;;) {
        int fd = try_connect(target, port);
        if (fd >= 0)
            return fd;
        if (now_us() > deadline) {
            fprintf(stderr, "vsock-bench: no listener at %s port %u after 60 s\n", target, port);
            exit(2);
        }
        usleep(50000);
    }
}

static int serve(unsigned port)
{
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (l < 0)
        die("socket(AF_VSOCK)");
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 4) != 0)
        die("bind/listen");
    printf("vsock-bench: listening on port %u\n", port);
    fflush(stdout);
    static char buf[1 << 16];
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0)
            die("accept");
        char mode;
        if (read_all(c, &mode, 1) == 0) {
            if (mode == 'p') {
                ssize_t r;
                while ((r = read(c, buf, sizeof buf)) > 0)
                    if (write_all(c, buf, (size_t)r) != 0)
                        break;
            } else if (mode == 's') {
                uint64_t total = 0;
                ssize_t r;
                while ((r = read(c, buf, sizeof buf)) > 0)
                    total += (uint64_t)r;
                write_all(c, &total, sizeof total);
            } else if (mode == 'q') {
                close(c);
                return 0;
            }
        }
        close(c);
    }
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "serve") == 0)
        return serve((unsigned)atoi(argv[2]));
    if (argc >= 6 && strcmp(argv[1], "pingpong") == 0) {
        unsigned port = (unsigned)atoi(argv[3]);
        long count = atol(argv[4]);
        size_t size = (size_t)atol(argv[5]);
        if (count <= 0 || size == 0 || size > 65536) {
            fprintf(stderr, "vsock-bench: COUNT > 0, 0 < SIZE <= 65536\n");
            return 2;
        }
        int fd = connect_retry(argv[2], port);
        char *buf = calloc(1, size);
        if (write_all(fd, "p", 1) != 0)
            die("write");
        uint64_t start = now_us();
        for (long i = 0; i < count; i++) {
            buf[0] = (char)i;
            if (write_all(fd, buf, size) != 0 || read_all(fd, buf, size) != 0 || buf[0] != (char)i) {
                fprintf(stderr, "vsock-bench: round trip %ld failed\n", i);
                return 1;
            }
        }
        uint64_t us = now_us() - start;
        printf("VSOCKBENCH op=pingpong size=%zu count=%ld us=%llu\n", size, count, (unsigned long long)us);
        return 0;
    }
    if (argc >= 5 && strcmp(argv[1], "stream") == 0) {
        unsigned port = (unsigned)atoi(argv[3]);
        uint64_t bytes = strtoull(argv[4], NULL, 0) << 20;
        int fd = connect_retry(argv[2], port);
        static char buf[1 << 16];
        memset(buf, 0x5a, sizeof buf);
        if (write_all(fd, "s", 1) != 0)
            die("write");
        uint64_t start = now_us();
        for (uint64_t sent = 0; sent < bytes;) {
            size_t n = bytes - sent < sizeof buf ? (size_t)(bytes - sent) : sizeof buf;
            if (write_all(fd, buf, n) != 0)
                die("write");
            sent += n;
        }
        shutdown(fd, SHUT_WR);
        uint64_t got = 0;
        if (read_all(fd, &got, sizeof got) != 0 || got != bytes) {
            fprintf(stderr, "vsock-bench: the guest counted %llu of %llu bytes\n", (unsigned long long)got,
                    (unsigned long long)bytes);
            return 1;
        }
        uint64_t us = now_us() - start;
        printf("VSOCKBENCH op=stream bytes=%llu us=%llu\n", (unsigned long long)bytes, (unsigned long long)us);
        return 0;
    }
    if (argc >= 4 && strcmp(argv[1], "quit") == 0) {
        int fd = connect_retry(argv[2], (unsigned)atoi(argv[3]));
        write_all(fd, "q", 1);
        close(fd);
        return 0;
    }
    fprintf(stderr, "usage: vsock-bench serve PORT | pingpong TARGET PORT COUNT SIZE | stream TARGET PORT MIB | quit TARGET PORT\n");
    return 2;
}
