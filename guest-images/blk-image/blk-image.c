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
 * Exit status 0 when the image is as expected, 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char orig(unsigned long s) { return (unsigned char)((s & 0xFF) ^ 0x5A); }

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
    fprintf(stderr, "usage: blk-image create FILE [SECTORS] | blk-image check FILE [written] [zeroes]\n");
    return 2;
}
