/* api-abuse: hostile clients against vmm's API socket, for the KVM scenario that checks the VM keeps running.
 *
 *   api-abuse SOCKET
 *
 * Each case prints "ABUSE <name> <status>" with the HTTP status the server answered (0: it closed without an
 * answer, which is a failure for every case below). Cases: a malformed request line, an oversized header section,
 * an oversized body (Content-Length over the limit), invalid UTF-8 and invalid JSON bodies for vm.create, chunked
 * transfer encoding, a client that sends half a request and stalls while another client is served (the other
 * client's status is printed), and 100 concurrent connections each sending vmm.ping (prints how many got 200).
 * Exit status 0 when every case got an answer, 1 otherwise. Plain POSIX, static. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static const char *sock_path;

static int dial(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    struct timeval tv = { .tv_sec = 20 };
    if (fd < 0) { perror("socket"); exit(2); }
    strncpy(a.sun_path, sock_path, sizeof a.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(2); }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

static void send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return; /* the server may close after answering early (413, 431) */
        p += w;
        n -= (size_t)w;
    }
}

/* Reads the status line's code; 0 when the connection closed first. */
static int read_status(int fd)
{
    char buf[64];
    size_t got = 0;
    while (got < sizeof buf - 1) {
        ssize_t r = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
        buf[got] = 0;
        if (strchr(buf, '\n')) break;
    }
    buf[got] = 0;
    int status = 0;
    if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1) status = 0;
    return status;
}

static int one(const char *req, size_t len)
{
    int fd = dial();
    send_all(fd, req, len);
    int s = read_status(fd);
    close(fd);
    return s;
}

static int failures;

static void report(const char *name, int status)
{
    printf("ABUSE %s %d\n", name, status);
    fflush(stdout);
    if (status == 0) failures++;
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: api-abuse SOCKET\n"); return 2; }
    sock_path = argv[1];

    const char *bad_line = "GARBAGE\x01 /api/v1/vm.info HTTP/1.1\r\n\r\n";
    report("malformed-request-line", one(bad_line, strlen(bad_line)));

    size_t big = 64 * 1024;
    char *hdr = malloc(big + 128);
    int n = sprintf(hdr, "GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(hdr + n, 'a', big);
    memcpy(hdr + n + big, "\r\n\r\n", 4);
    report("oversized-headers", one(hdr, n + big + 4));

    const char *big_body = "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n{";
    report("oversized-body", one(big_body, strlen(big_body)));

    const char utf8[] = "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n"
                        "{\"payload\":{\"kernel\":\"\xff\xfe\"}}";
    report("invalid-utf8", one(utf8, sizeof utf8 - 1));

    const char *json = "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"cpus\":[";
    report("invalid-json", one(json, strlen(json)));

    const char *chunked = "PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n\r\n";
    report("chunked", one(chunked, strlen(chunked)));

    /* Half a request, then silence; meanwhile another client must be served. */
    int stalled = dial();
    const char *half = "GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n";
    send_all(stalled, half, strlen(half));
    const char *ping = "GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n";
    report("served-while-another-stalls", one(ping, strlen(ping)));
    report("stalled-client", read_status(stalled)); /* 408 once the header timeout passes */
    close(stalled);

    /* 100 concurrent connections: all open first, then each sends vmm.ping, then all answers are read. */
    enum { N = 100 };
    int fds[N], ok = 0;
    const char *info = "GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n";
    for (int i = 0; i < N; i++) fds[i] = dial();
    for (int i = 0; i < N; i++) send_all(fds[i], info, strlen(info));
    for (int i = 0; i < N; i++) {
        if (read_status(fds[i]) == 200) ok++;
        close(fds[i]);
    }
    printf("ABUSE concurrent-100 %d\n", ok);
    if (ok != N) failures++;
    return failures ? 1 : 0;
}
