/*
 * net-responder: host side of virtio-test's net subtest.  Runs in a network
 * namespace next to the VMM (or QEMU), which creates the tap interface.
 *
 *   net-responder IFNAME [timeout_s]      (default timeout 60 s)
 *
 * Waits until IFNAME exists, brings it up, and listens on an AF_PACKET socket
 * bound to it:
 *  - ethertype 0x88B5 frame whose payload is "vmm-net-test ping " + 16 bytes:
 *    answers with an 0x88B5 frame to the sender's MAC from 02:00:00:00:00:01,
 *    payload "vmm-net-test pong " + the same 16 bytes (padded to 60 bytes);
 *  - IPv4/UDP to port 7: verifies the IPv4 header checksum and the UDP checksum
 *    and answers with an 0x88B5 frame "vmm-net-test csum-ok" or "csum-bad".  When
 *    the kernel hands over the packet with the checksum still to be done
 *    (VIRTIO_NET_HDR_F_NEEDS_CSUM: the guest's offload request passed through
 *    the tap), csum_start/csum_offset must point at the UDP checksum and the
 *    finished checksum (computed here as the device would) must verify.
 * One line per frame received and sent.  Exits 0 once the ping and the
 * checksum packet were answered, or when the interface goes away / the timeout
 * passes after the ping was answered (the checksum packet is optional); 1 if a
 * checksum was bad; 3 on timeout (or interface gone) without a ping.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_TEST 0x88B5
static const uint8_t our_mac[6] = { 0x02, 0x00, 0x00, 0x00, 0x00, 0x01 };
static const char ping[] = "vmm-net-test ping ", pong[] = "vmm-net-test pong ";

static int sock = -1, ifindex, vnet; /* vnet: PACKET_VNET_HDR on (10-byte virtio_net_hdr in front) */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *mac_str(const uint8_t *m)
{
    static char b[2][18];
    static int k;
    k ^= 1;
    snprintf(b[k], sizeof(b[k]), "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
    return b[k];
}

static void send_frame(const uint8_t *dst, const char *payload, const uint8_t *tail, size_t tail_len, const char *what)
{
    uint8_t buf[10 + 128];
    uint8_t *f = buf + (vnet ? 10 : 0);
    memset(buf, 0, sizeof(buf));
    memcpy(f, dst, 6);
    memcpy(f + 6, our_mac, 6);
    f[12] = ETH_TEST >> 8, f[13] = ETH_TEST & 0xFF;
    size_t n = 14, pl = strlen(payload);
    memcpy(f + n, payload, pl);
    n += pl;
    memcpy(f + n, tail, tail_len);
    n += tail_len;
    if (n < 60)
        n = 60;
    ssize_t r = send(sock, buf, n + (vnet ? 10 : 0), 0);
    if (r < 0)
        printf("net-responder: send failed: %s\n", strerror(errno));
    else
        printf("net-responder: sent %zu bytes to %s ethertype 0x%04x: %s\n", n, mac_str(dst), ETH_TEST, what);
    fflush(stdout);
}

static uint32_t sum16(uint32_t s, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i += 2)
        s += (uint32_t)p[i] << 8 | p[i + 1];
    if (n & 1)
        s += (uint32_t)p[n - 1] << 8;
    return s;
}
static uint16_t fold(uint32_t s)
{
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)s;
}

/* Returns 1 if the UDP packet's checksums are right; prints why not. */
static int check_udp(uint8_t *f, size_t n, const struct virtio_net_hdr *h)
{
    uint8_t *ip = f + 14;
    size_t ihl = (size_t)(ip[0] & 0x0F) * 4, ip_len = (size_t)ip[2] << 8 | ip[3];
    if (ihl < 20 || 14 + ip_len > n || ip_len < ihl + 8) {
        printf("net-responder: csum: malformed IPv4 packet\n");
        return 0;
    }
    if (fold(sum16(0, ip, ihl)) != 0xFFFF) {
        printf("net-responder: csum: bad IPv4 header checksum\n");
        return 0;
    }
    uint8_t *udp = ip + ihl;
    size_t udp_len = (size_t)udp[4] << 8 | udp[5];
    if (udp_len < 8 || udp_len > ip_len - ihl) {
        printf("net-responder: csum: bad UDP length %zu\n", udp_len);
        return 0;
    }
    uint32_t pseudo = sum16(0, ip + 12, 8) + 17 + (uint32_t)udp_len;
    if (h && (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
        size_t cs = h->csum_start, co = h->csum_offset;
        printf("net-responder: csum: partial checksum (NEEDS_CSUM csum_start %zu csum_offset %zu, field 0x%04x, "
               "pseudo-header sum 0x%04x)\n", cs, co, (unsigned)(udp[6] << 8 | udp[7]), fold(pseudo));
        if (cs != (size_t)(udp - f) || co != 6) {
            printf("net-responder: csum: csum_start/csum_offset do not point at the UDP checksum\n");
            return 0;
        }
        uint16_t c = (uint16_t)~fold(sum16(0, udp, udp_len)); /* what the device does */
        udp[6] = (uint8_t)(c >> 8), udp[7] = (uint8_t)c;
    }
    if (udp[6] == 0 && udp[7] == 0) {
        printf("net-responder: csum: UDP checksum field is 0 (none)\n");
        return 0;
    }
    uint16_t v = fold(sum16(pseudo, udp, udp_len));
    printf("net-responder: csum: UDP checksum 0x%04x %s\n", (unsigned)(udp[6] << 8 | udp[7]),
           v == 0xFFFF ? "verifies" : "does not verify");
    return v == 0xFFFF;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: net-responder IFNAME [timeout_s]\n");
        return 2;
    }
    const char *ifname = argv[1];
    double timeout = argc > 2 ? atof(argv[2]) : 60, t0 = now();
    setvbuf(stdout, 0, _IOLBF, 0);

    while (!(ifindex = (int)if_nametoindex(ifname))) {
        if (now() - t0 > timeout) {
            printf("net-responder: timeout: interface %s never appeared\n", ifname);
            return 3;
        }
        usleep(20000);
    }
    int ctl = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
    if (ctl < 0 || ioctl(ctl, SIOCGIFFLAGS, &ifr) < 0) {
        perror("net-responder: SIOCGIFFLAGS");
        return 2;
    }
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(ctl, SIOCSIFFLAGS, &ifr) < 0) {
        perror("net-responder: SIOCSIFFLAGS");
        return 2;
    }
    sock = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (sock < 0) {
        perror("net-responder: socket(AF_PACKET)");
        return 2;
    }
    int one = 1;
    vnet = setsockopt(sock, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)) == 0;
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = ifindex;
    if (bind(sock, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        perror("net-responder: bind");
        return 2;
    }
    printf("net-responder: %s (index %d) up, listening%s\n", ifname, ifindex, vnet ? " (vnet header)" : "");

    int pings = 0, csum_ok = 0, csum_bad = 0;
    for (;;) {
        double left = timeout - (now() - t0);
        if (left <= 0) {
            printf("net-responder: timeout after %.0f s (%d pings answered)\n", timeout, pings);
            return pings ? (csum_bad ? 1 : 0) : 3;
        }
        struct pollfd pfd = { sock, POLLIN, 0 };
        int pr = poll(&pfd, 1, left < 0.5 ? (int)(left * 1000) + 1 : 500);
        if (pr == 0) {
            if (!if_nametoindex(ifname)) {
                printf("net-responder: %s is gone (%d pings answered)\n", ifname, pings);
                return pings ? (csum_bad ? 1 : 0) : 3;
            }
            continue;
        }
        uint8_t buf[10 + 65536];
        struct sockaddr_ll from;
        socklen_t fl = sizeof(from);
        ssize_t r = recvfrom(sock, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            printf("net-responder: receive: %s (%d pings answered)\n", strerror(errno), pings);
            return pings ? (csum_bad ? 1 : 0) : 3;
        }
        if (from.sll_pkttype == PACKET_OUTGOING)
            continue;
        struct virtio_net_hdr *h = vnet ? (struct virtio_net_hdr *)buf : 0;
        uint8_t *f = buf + (vnet ? 10 : 0);
        size_t n = (size_t)r - (vnet ? 10 : 0);
        if (n < 14)
            continue;
        unsigned et = (unsigned)f[12] << 8 | f[13];
        const char *kind = "other";
        int is_ping = et == ETH_TEST && n >= 14 + 18 + 16 && memcmp(f + 14, ping, 18) == 0;
        int is_udp = et == 0x0800 && n >= 14 + 20 + 8 && f[14 + 9] == 17 &&
                     (f[14 + (f[14] & 0x0F) * 4 + 2] << 8 | f[14 + (f[14] & 0x0F) * 4 + 3]) == 7;
        if (is_ping)
            kind = "ping";
        else if (is_udp)
            kind = "udp to port 7 (checksum test)";
        printf("net-responder: received %zu bytes from %s ethertype 0x%04x: %s\n", n, mac_str(f + 6), et, kind);
        uint8_t src[6];
        memcpy(src, f + 6, 6);
        if (is_ping) {
            send_frame(src, pong, f + 14 + 18, 16, "pong");
            pings++;
        } else if (is_udp) {
            int ok = check_udp(f, n, h);
            send_frame(src, ok ? "vmm-net-test csum-ok" : "vmm-net-test csum-bad", 0, 0, ok ? "csum-ok" : "csum-bad");
            if (ok)
                csum_ok++;
            else
                csum_bad++;
            if (pings)
                return csum_bad ? 1 : 0;
        }
    }
}
