/*
 * vsock-peer: both ends of vmm's virtio-vsock end-to-end test, one static program.
 *
 * In the guest (AF_VSOCK):
 *   vsock-peer guest-serve PORT              accept one connection on PORT, echo it transformed
 *   vsock-peer guest-connect PORT BYTES      connect to the host (cid 2) PORT, send BYTES, check the echo
 * On the host, through vmm's hybrid vsock (AF_UNIX, Firecracker's protocol):
 *   vsock-peer host-connect PATH PORT BYTES  connect to PATH, "CONNECT PORT\n", expect "OK ", then as
 *                                            guest-connect (retries while the guest does not listen yet)
 *   vsock-peer host-serve PATH_PORT          listen on PATH_PORT, accept one connection, echo it transformed
 *
 * The sender sends BYTES of a fixed pattern while reading the echo (poll: neither side waits for the other
 * to drain, so several hundred KiB pass through vmm's credit flow control both ways), half-closes, reads to
 * end of stream and checks every byte (each echoed byte is the sent one XOR 0xA5). Both ends print the
 * FNV-1a hash of the plain data, so the test can compare them:
 *   vsock-peer: <mode> port P: sent N received N fnv HASH ok in T ms (R MB/s each way)   (sender)
 *   vsock-peer: <mode> port P: echoed N fnv HASH                     (server)
 * A failure prints "vsock-peer: <mode> ... FAILED: why" and exits 1. Every mode gives up after 600 s (a nested
 * TCG boot of the guest alone can take minutes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define XOR 0xA5

static const char *mode = "?";
static unsigned port;

static void fail(const char *why)
{
    printf("vsock-peer: %s port %u: FAILED: %s (%s)\n", mode, port, why, errno ? strerror(errno) : "-");
    fflush(stdout);
    exit(1);
}

static uint8_t pattern(uint64_t i) { return (uint8_t)(i * 131 + (i >> 9)); }

static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

/* Echo everything transformed until end of stream, then close. */
static void serve(int fd)
{
    static uint8_t buf[65536];
    uint64_t total = 0, h = 0xcbf29ce484222325ULL;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail("read");
        if (n == 0)
            break;
        h = fnv(h, buf, (size_t)n);
        for (ssize_t i = 0; i < n; i++)
            buf[i] ^= XOR;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(fd, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                fail("write");
            off += w;
        }
        total += (uint64_t)n;
    }
    close(fd);
    printf("vsock-peer: %s port %u: echoed %llu fnv %016llx\n", mode, port, (unsigned long long)total, (unsigned long long)h);
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Send `bytes` of the pattern while checking the echo; half-close once sent; read to end of stream. */
static void exchange(int fd, uint64_t bytes)
{
    double start = now_ms();
    static uint8_t out[16384], in[65536];
    uint64_t sent = 0, received = 0, h = 0xcbf29ce484222325ULL;
    int shut = 0;
    /* Non-blocking: a write must never wait for the peer while the peer waits for us to read its echo. */
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
        fail("fcntl");
    for (;;) {
        if (sent == bytes && !shut) {
            if (shutdown(fd, SHUT_WR) < 0)
                fail("shutdown");
            shut = 1;
        }
        struct pollfd p = { .fd = fd, .events = POLLIN | (sent < bytes ? POLLOUT : 0) };
        if (poll(&p, 1, 60000) <= 0)
            fail("no progress for 60 s");
        if (p.revents & POLLOUT && sent < bytes) {
            size_t n = bytes - sent < sizeof out ? (size_t)(bytes - sent) : sizeof out;
            for (size_t i = 0; i < n; i++)
                out[i] = pattern(sent + i);
            ssize_t w = write(fd, out, n);
            if (w < 0 && errno != EINTR && errno != EAGAIN)
                fail("write");
            if (w > 0) {
                h = fnv(h, out, (size_t)w);
                sent += (uint64_t)w;
            }
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t n = read(fd, in, sizeof in);
            if (n < 0 && errno != EINTR && errno != EAGAIN)
                fail("read");
            if (n == 0) {
                if (received != bytes) {
                    errno = 0;
                    fail("end of stream before the whole echo");
                }
                break;
            }
            for (ssize_t i = 0; i < n; i++) {
                if ((uint8_t)(in[i] ^ XOR) != pattern(received + (uint64_t)i)) {
                    errno = 0;
                    fail("echo differs from what was sent");
                }
            }
            if (n > 0)
                received += (uint64_t)n;
            if (received > bytes) {
                errno = 0;
                fail("more echo than was sent");
            }
        }
    }
    close(fd);
    double ms = now_ms() - start;
    printf("vsock-peer: %s port %u: sent %llu received %llu fnv %016llx ok in %.0f ms (%.2f MB/s each way)\n", mode, port,
           (unsigned long long)sent, (unsigned long long)received, (unsigned long long)h, ms, ms > 0 ? sent / ms / 1e3 : 0.0);
}

static int unix_addr(const char *path, struct sockaddr_un *a)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a->sun_path)
        fail("path too long");
    strcpy(a->sun_path, path);
    return (int)sizeof *a;
}

/* One host-initiated connection attempt: 1 with *out set on "OK", 0 to retry (no socket yet, guest not listening). */
static int host_connect_once(const char *path, int *out)
{
    struct sockaddr_un a;
    int len = unix_addr(path, &a);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        fail("socket");
    if (connect(fd, (struct sockaddr *)&a, (socklen_t)len) < 0) {
        close(fd);
        return 0;
    }
    char line[64];
    int n = snprintf(line, sizeof line, "CONNECT %u\n", port);
    if (write(fd, line, (size_t)n) != n) {
        close(fd);
        return 0;
    }
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t r = read(fd, line + got, 1);
        if (r <= 0) {
            close(fd); /* vmm closed it: the guest answered RST (nobody listens yet) */
            return 0;
        }
        if (line[got++] == '\n')
            break;
    }
    line[got] = 0;
    if (strncmp(line, "OK ", 3) != 0) {
        errno = 0;
        fail("the answer to CONNECT is not OK");
    }
    *out = fd;
    return 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(600);
    if (argc < 3) {
        fprintf(stderr, "usage: vsock-peer guest-serve PORT | guest-connect PORT BYTES | host-connect PATH PORT BYTES | host-serve PATH_PORT\n");
        return 2;
    }
    mode = argv[1];
    if (!strcmp(mode, "guest-serve")) {
        port = (unsigned)strtoul(argv[2], NULL, 10);
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4) < 0)
            fail("listen");
        printf("vsock-peer: %s port %u: listening\n", mode, port);
        int fd = accept(s, NULL, NULL);
        if (fd < 0)
            fail("accept");
        serve(fd);
    } else if (!strcmp(mode, "guest-connect") && argc == 4) {
        port = (unsigned)strtoul(argv[2], NULL, 10);
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
        if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
            fail("connect");
        exchange(fd, strtoull(argv[3], NULL, 10));
    } else if (!strcmp(mode, "host-connect") && argc == 5) {
        port = (unsigned)strtoul(argv[3], NULL, 10);
        int fd = -1, tries = 0;
        while (!host_connect_once(argv[2], &fd)) {
            if (++tries == 1100) {
                errno = 0;
                fail("no OK after 1100 tries");
            }
            usleep(500000);
        }
        printf("vsock-peer: %s port %u: connected after %d refusals\n", mode, port, tries);
        exchange(fd, strtoull(argv[4], NULL, 10));
    } else if (!strcmp(mode, "host-serve")) {
        const char *path = argv[2], *u = strrchr(path, '_');
        port = u ? (unsigned)strtoul(u + 1, NULL, 10) : 0;
        struct sockaddr_un a;
        int len = unix_addr(path, &a);
        unlink(path);
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&a, (socklen_t)len) < 0 || listen(s, 4) < 0)
            fail("listen");
        int fd = accept(s, NULL, NULL);
        if (fd < 0)
            fail("accept");
        serve(fd);
        unlink(path);
    } else {
        fprintf(stderr, "vsock-peer: unknown mode or wrong arguments: %s\n", mode);
        return 2;
    }
    return 0;
}
