/* io-bench - the guest half of the vhost-user benchmarks (benchmarks/e2e/run.sh --vhost): runs inside a Linux
 * guest (static binary in its initramfs) and measures one file or block device the way fio's psync engine would,
 * with no fio in the guest.
 *
 *   io-bench randread PATH BLOCK_SIZE COUNT THREADS   COUNT random aligned reads of BLOCK_SIZE, spread over
 *                                                      THREADS threads (each its own fd: THREADS requests in flight)
 *   io-bench seqread PATH BLOCK_SIZE TOTAL_MIB         one thread reading TOTAL_MIB from the start, BLOCK_SIZE a time
 *
 * Block devices are opened O_DIRECT (the page cache would turn repeat reads into memory copies); files are opened
 * normally (virtio-fs with cache=none sends every read to the daemon anyway). Prints one line:
 *   IOBENCH op=randread bs=4096 ios=N us=T threads=K errors=E
 * us is wall time of the timed loop only; errors counts short or failed reads (any error makes the run invalid).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define MAX_THREADS 64

static const char *path;
static size_t block_size;
static uint64_t blocks;     /* whole blocks in the file or device */
static long per_thread;
static int direct;
static long errors_total;
static pthread_mutex_t errors_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int open_target(void)
{
    int fd = open(path, O_RDONLY | (direct ? O_DIRECT : 0));
    if (fd < 0) {
        fprintf(stderr, "io-bench: open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    return fd;
}

static void *buffer(void)
{
    void *p;
    if (posix_memalign(&p, 4096, block_size) != 0) {
        fprintf(stderr, "io-bench: out of memory\n");
        exit(2);
    }
    memset(p, 0, block_size);
    return p;
}

/* xorshift64*: a cheap, per-thread random block index. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void *randread_thread(void *arg)
{
    uint64_t state = 0x9E3779B97F4A7C15ULL ^ (uintptr_t)arg;
    int fd = open_target();
    char *buf = buffer();
    long errors = 0;
    for (long i = 0; i < per_thread; i++) {
        off_t at = (off_t)(next_random(&state) % blocks) * (off_t)block_size;
        if (pread(fd, buf, block_size, at) != (ssize_t)block_size)
            errors++;
    }
    pthread_mutex_lock(&errors_lock);
    errors_total += errors;
    pthread_mutex_unlock(&errors_lock);
    free(buf);
    close(fd);
    return NULL;
}

static uint64_t target_size(void)
{
    int fd = open_target();
    struct stat st;
    uint64_t size = 0;
    if (fstat(fd, &st) != 0) {
        fprintf(stderr, "io-bench: stat %s: %s\n", path, strerror(errno));
        exit(2);
    }
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
            fprintf(stderr, "io-bench: BLKGETSIZE64 %s: %s\n", path, strerror(errno));
            exit(2);
        }
    } else {
        size = (uint64_t)st.st_size;
    }
    close(fd);
    return size;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: io-bench randread PATH BS COUNT THREADS | seqread PATH BS TOTAL_MIB\n");
        return 2;
    }
    const char *op = argv[1];
    path = argv[2];
    block_size = strtoul(argv[3], NULL, 0);
    if (block_size == 0 || block_size % 512 != 0 || block_size > (64u << 20)) {
        fprintf(stderr, "io-bench: block size %s: a multiple of 512 up to 64 MiB\n", argv[3]);
        return 2;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "io-bench: %s: %s\n", path, strerror(errno));
        return 2;
    }
    direct = S_ISBLK(st.st_mode);
    uint64_t size = target_size();
    blocks = size / block_size;
    if (blocks == 0) {
        fprintf(stderr, "io-bench: %s holds no whole %zu-byte block\n", path, block_size);
        return 2;
    }
    uint64_t start, ios;
    int threads = 1;
    if (strcmp(op, "randread") == 0) {
        if (argc < 6) {
            fprintf(stderr, "io-bench: randread needs COUNT and THREADS\n");
            return 2;
        }
        long count = strtol(argv[4], NULL, 0);
        threads = atoi(argv[5]);
        if (count <= 0 || threads < 1 || threads > MAX_THREADS) {
            fprintf(stderr, "io-bench: COUNT > 0 and 1 <= THREADS <= %d\n", MAX_THREADS);
            return 2;
        }
        per_thread = count / threads;
        if (per_thread == 0)
            per_thread = 1;
        pthread_t t[MAX_THREADS];
        start = now_us();
        for (int i = 0; i < threads; i++)
            pthread_create(&t[i], NULL, randread_thread, (void *)(uintptr_t)(i + 1));
        for (int i = 0; i < threads; i++)
            pthread_join(t[i], NULL);
        ios = (uint64_t)per_thread * (uint64_t)threads;
    } else if (strcmp(op, "seqread") == 0) {
        uint64_t total = strtoull(argv[4], NULL, 0) << 20;
        if (total > size)
            total = size;
        int fd = open_target();
        char *buf = buffer();
        ios = total / block_size;
        start = now_us();
        for (uint64_t i = 0; i < ios; i++) {
            if (pread(fd, buf, block_size, (off_t)(i * block_size)) != (ssize_t)block_size)
                errors_total++;
        }
        free(buf);
        close(fd);
    } else {
        fprintf(stderr, "io-bench: unknown operation %s\n", op);
        return 2;
    }
    uint64_t us = now_us() - start;
    printf("IOBENCH op=%s bs=%zu ios=%llu us=%llu threads=%d errors=%ld\n", op, block_size,
           (unsigned long long)ios, (unsigned long long)us, threads, errors_total);
    return errors_total == 0 ? 0 : 1;
}
