/*
 * blk-image: host-side helper for virtio-test's blk subtest.
 *
 *   blk-image create FILE [SECTORS]      raw image (default 2048 sectors = 1 MiB), every byte of
 *                                        512-byte sector s = (s & 0xFF) ^ 0x5A
 *   blk-image check FILE [written] [zeroes]
 *       Checks the image after a guest run.  written: sectors 100..131 hold the guest's pattern,
 *       byte j of sector s = ((s * 3 + j) & 0xFF) ^ 0xA5 (without it they must be unchanged, as
 *       after blk-ro).  zeroes: sectors 200..207 are zero (else unchanged).  Sectors 300..307
 *       (discarded) are not checked; every other sector must be unchanged.
 *   blk-image crash-check FILE FLUSHED
 *       Checks the image after vmm was killed in the middle of virtio-test's blk-stream (see test_blk_stream there),
 *       FLUSHED being the last generation vmm reported flushed ("blk-stream: flushed G") before it died, 0 if none.
 *       It passes when (1) every sector outside the stream (1024..1087) is unchanged; (2) every stream sector is
 *       entirely generation g's pattern for itself for some g (no foreign, stale-run or torn sector: a process kill
 *       stops the kernel's copy of a pwrite at a page, never inside a sector); (3) g >= FLUSHED (no write the guest
 *       saw completed before its last reported flush is lost); (4) the generations never rise with the sector number
 *       and span at most two (the image is a prefix of the guest's in-order write stream: G+1 up to some sector,
 *       G after it).
 * Exit status 0 when the image is as expected, 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char orig(unsigned long s) { return (unsigned char)((s & 0xFF) ^ 0x5A); }

#define STREAM_FIRST 1024u
#define STREAM_SECTORS 64u

/* virtio-test's stream_sector: "VMMS", s, g (little-endian), then ((g * 131 + s * 7 + j) & 0xFF) ^ 0x3C. */
static void stream_sector(unsigned char *p, unsigned s, unsigned g)
{
    for (unsigned j = 0; j < 512; j++)
        p[j] = (unsigned char)(((g * 131 + s * 7 + j) & 0xFF) ^ 0x3C);
    memcpy(p, "VMMS", 4);
    for (int i = 0; i < 4; i++) {
        p[4 + i] = (unsigned char)(s >> 8 * i);
        p[8 + i] = (unsigned char)(g >> 8 * i);
    }
}

static int crash_check(const char *path, unsigned flushed)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return 1;
    }
    unsigned char sec[512], want[512];
    unsigned long s = 0, bad = 0, newer = 0;
    unsigned lo = 0xFFFFFFFFu, hi = 0, prev = 0xFFFFFFFFu, rises = 0;
    for (; fread(sec, 1, sizeof(sec), f) == sizeof(sec); s++) {
        if (s < STREAM_FIRST || s >= STREAM_FIRST + STREAM_SECTORS) {
            memset(want, orig(s), sizeof(want));
            if (memcmp(sec, want, sizeof(want)) != 0 && bad++ < 10)
                printf("blk-image: sector %lu outside the stream changed (first byte 0x%02x)\n", s, sec[0]);
            continue;
        }
        unsigned g = sec[8] | sec[9] << 8 | sec[10] << 16 | (unsigned)sec[11] << 24;
        stream_sector(want, (unsigned)s, g);
        if (memcmp(sec, want, sizeof(want)) != 0) {
            if (bad++ < 10)
                printf("blk-image: stream sector %lu is no generation's pattern (header generation %u)\n", s, g);
            continue;
        }
        if (g < flushed && bad++ < 10)
            printf("blk-image: stream sector %lu holds generation %u, older than the flushed %u\n", s, g, flushed);
        if (prev != 0xFFFFFFFFu && g > prev && rises++ < 10)
            printf("blk-image: stream sector %lu holds generation %u after %u: written out of order\n", s, g, prev);
        prev = g;
        lo = g < lo ? g : lo;
        hi = g > hi ? g : hi;
        newer += g > flushed;
    }
    fclose(f);
    int ok = !bad && !rises && s >= STREAM_FIRST + STREAM_SECTORS && hi - lo <= 1;
    printf("blk-image: %s: %lu sectors; stream generations %u..%u, %lu sectors newer than the flushed %u; %lu bad, "
           "%u out of order: %s\n", path, s, lo, hi, newer, flushed, bad, rises, ok ? "consistent" : "INCONSISTENT");
    return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "create") == 0) {
        unsigned long n = argc > 3 ? strtoul(argv[3], 0, 0) : 2048;
        FILE *f = fopen(argv[2], "wb");
        if (!f) {
            perror(argv[2]);
            return 1;
        }
        unsigned char sec[512];
        for (unsigned long s = 0; s < n; s++) {
            memset(sec, orig(s), sizeof(sec));
            if (fwrite(sec, 1, sizeof(sec), f) != sizeof(sec)) {
                perror("write");
                return 1;
            }
        }
        if (fclose(f) != 0) {
            perror("close");
            return 1;
        }
        printf("blk-image: created %s, %lu sectors\n", argv[2], n);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "check") == 0) {
        int written = 0, zeroes = 0;
        for (int i = 3; i < argc; i++) {
            if (strcmp(argv[i], "written") == 0)
                written = 1;
            else if (strcmp(argv[i], "zeroes") == 0)
                zeroes = 1;
            else {
                fprintf(stderr, "blk-image: unknown check option %s\n", argv[i]);
                return 2;
            }
        }
        FILE *f = fopen(argv[2], "rb");
        if (!f) {
            perror(argv[2]);
            return 1;
        }
        unsigned char sec[512];
        unsigned long s = 0, bad_sectors = 0;
        for (; fread(sec, 1, sizeof(sec), f) == sizeof(sec); s++) {
            if (s >= 300 && s < 308)
                continue; /* discarded: contents unspecified */
            unsigned long bad = 0;
            for (unsigned j = 0; j < 512; j++) {
                unsigned char want = orig(s);
                if (written && s >= 100 && s < 132)
                    want = (unsigned char)(((s * 3 + j) & 0xFF) ^ 0xA5);
                else if (zeroes && s >= 200 && s < 208)
                    want = 0;
                bad += sec[j] != want;
            }
            if (bad && bad_sectors++ < 10)
                printf("blk-image: sector %lu: %lu bytes differ (first byte 0x%02x)\n", s, bad, sec[0]);
        }
        fclose(f);
        printf("blk-image: %s: %lu sectors checked (written=%d zeroes=%d), %lu bad\n", argv[2], s, written, zeroes,
               bad_sectors);
        return bad_sectors || s < 320 ? 1 : 0;
    }
    if (argc == 4 && strcmp(argv[1], "crash-check") == 0)
        return crash_check(argv[2], (unsigned)strtoul(argv[3], 0, 0));
    fprintf(stderr, "usage: blk-image create FILE [SECTORS] | blk-image check FILE [written] [zeroes] | "
                    "blk-image crash-check FILE FLUSHED\n");
    return 2;
}
