/*
 * kvm_exit_floor - minimal bare-C KVM program; the floor for our VMM's exit cost.
 *
 * Usage:
 *   kvm_exit_floor pio  N [real|prot32|long] [irqchip]   N x `out dx, al` to port 0x10, then hlt
 *   kvm_exit_floor mmio N [real|prot32|long] [irqchip]   N x `mov [mem], al` to unbacked GPA 0xF0000, then hlt
 *   kvm_exit_floor caps                        print KVM capabilities and try
 *                                              KVM_CREATE_IRQCHIP / KVM_CREATE_PIT2
 *
 * Guest: 1 vCPU, one 64 KiB memslot at GPA 0 (code at 0x1000, page tables at
 * 0x2000..0x4fff for long mode). GPA 0xF0000 lies outside every memslot, so
 * writes there exit to userspace as KVM_EXIT_MMIO.
 *
 * irqchip: also create the in-kernel irqchip and PIT (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) as vmm does by
 * default, to separate their cost from the VMM's. HLT then stays in the kernel, so the run ends after the
 * N-th expected exit instead of at the guest's hlt.
 *
 * Timing starts after the first exit (one-off warm-up costs), so the per-exit figures are
 * averages over exits 2..N. user/sys come from getrusage(RUSAGE_SELF).
 *
 * Output (one line, stdout):
 *   mode=pio exits=N wall_ns_per_exit=.. user_ns_per_exit=.. sys_ns_per_exit=.. guest=real
 *
 * Exit status: 0 on success, 1 on any failure (with a message on stderr).
 * Build: gcc -O2 -Wall -Werror -static -o kvm_exit_floor kvm_exit_floor.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000ULL /* 64 KiB memslot at GPA 0 */
#define CODE_GPA 0x1000ULL
#define PML4_GPA 0x2000ULL
#define PDPT_GPA 0x3000ULL
#define PD_GPA 0x4000ULL
#define PIO_PORT 0x10
#define MMIO_GPA 0xF0000ULL

__attribute__((noreturn)) static void die(const char *what)
{
    fprintf(stderr, "kvm_exit_floor: %s failed: %s (errno %d)\n", what, strerror(errno), errno);
    exit(1);
}

__attribute__((format(printf, 1, 2), noreturn)) static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvm_exit_floor: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static int open_kvm(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open(/dev/kvm)");
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (api != KVM_API_VERSION)
        fail("KVM_GET_API_VERSION returned %d, expected %d", api, KVM_API_VERSION);
    return kvm;
}

static const struct {
    int cap;
    const char *name;
} caps[] = {
#define C(x) {KVM_CAP_##x, #x}
    C(IRQCHIP), C(HLT), C(USER_MEMORY), C(SET_TSS_ADDR), C(EXT_CPUID), C(NR_VCPUS),
    C(NR_MEMSLOTS), C(MP_STATE), C(COALESCED_MMIO), C(SYNC_MMU), C(IRQ_ROUTING), C(IRQFD),
    C(PIT2), C(PIT_STATE2), C(IOEVENTFD), C(SET_IDENTITY_MAP_ADDR), C(ADJUST_CLOCK),
    C(VCPU_EVENTS), C(DEBUGREGS), C(XSAVE), C(XCRS), C(MAX_VCPUS), C(TSC_DEADLINE_TIMER),
    C(KVMCLOCK_CTRL), C(SIGNAL_MSI), C(READONLY_MEM), C(SPLIT_IRQCHIP), C(X2APIC_API),
    C(IMMEDIATE_EXIT), C(GET_MSR_FEATURES),
#undef C
};

static int do_caps(void)
{
    int kvm = open_kvm();
    printf("api_version=%d\n", ioctl(kvm, KVM_GET_API_VERSION, 0));
    printf("vcpu_mmap_size=%d\n", ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0));
    for (size_t i = 0; i < sizeof caps / sizeof caps[0]; i++)
        printf("KVM_CAP_%s(%d)=%d\n", caps[i].name, caps[i].cap,
               ioctl(kvm, KVM_CHECK_EXTENSION, caps[i].cap));

    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
        die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    printf("KVM_CREATE_IRQCHIP=ok\n");
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        die("KVM_CREATE_PIT2");
    printf("KVM_CREATE_PIT2=ok\n");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU (with irqchip)");
    printf("KVM_CREATE_VCPU=ok\n");
    struct kvm_lapic_state lapic;
    if (ioctl(vcpu, KVM_GET_LAPIC, &lapic) < 0)
        die("KVM_GET_LAPIC");
    printf("KVM_GET_LAPIC=ok apic_id=%u\n", (unsigned)(uint8_t)lapic.regs[0x23]);
    close(vcpu);
    close(vm);
    close(kvm);
    return 0;
}

enum guest_mode { REAL, PROT32, LONG };

static void set_cpuid(int kvm, int vcpu)
{
    int n = 256;
    struct kvm_cpuid2 *c = calloc(1, sizeof *c + n * sizeof(struct kvm_cpuid_entry2));
    if (!c)
        die("calloc");
    c->nent = n;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, c) < 0)
        die("KVM_SET_CPUID2");
    free(c);
}

static void flat_seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code64)
{
    memset(s, 0, sizeof *s);
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->s = 1;
    s->g = 1;
    s->l = code64;
    s->db = !code64;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "caps") == 0)
        return do_caps();
    if (argc < 3 || argc > 5 || (strcmp(argv[1], "pio") && strcmp(argv[1], "mmio"))) {
        fprintf(stderr, "usage: %s pio|mmio N [real|prot32|long] [irqchip]\n       %s caps\n",
                argv[0], argv[0]);
        return 2;
    }
    const int mmio = strcmp(argv[1], "mmio") == 0;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(argv[2], &end, 10);
    if (errno || *end || n < 1 || n > 0xffffffffULL) {
        fprintf(stderr, "kvm_exit_floor: N must be in 1..4294967295, got '%s'\n", argv[2]);
        return 2;
    }
    enum guest_mode gm = REAL;
    const char *gname = argc >= 4 ? argv[3] : "real";
    if (!strcmp(gname, "real"))
        gm = REAL;
    else if (!strcmp(gname, "prot32"))
        gm = PROT32;
    else if (!strcmp(gname, "long"))
        gm = LONG;
    else {
        fprintf(stderr, "kvm_exit_floor: unknown guest mode '%s'\n", gname);
        return 2;
    }
    int irqchip = 0;
    if (argc == 5) {
        if (strcmp(argv[4], "irqchip")) {
            fprintf(stderr, "kvm_exit_floor: unknown option '%s' (expected 'irqchip')\n", argv[4]);
            return 2;
        }
        irqchip = 1;
    }

    int kvm = open_kvm();
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap(guest memory)");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    if (irqchip) {
        if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
            die("KVM_SET_TSS_ADDR");
        if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
            die("KVM_CREATE_IRQCHIP");
        struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
        if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
            die("KVM_CREATE_PIT2");
    }

    /* Guest code:  L: <access> ; dec ecx ; jnz L ; hlt */
    uint8_t *p = mem + CODE_GPA;
    if (mmio) {
        *p++ = 0x88; /* mov [bx] (16-bit addr) / [edi] / [rdi], al */
        *p++ = 0x07;
    } else {
        *p++ = 0xee; /* out dx, al */
    }
    if (gm == REAL)
        *p++ = 0x66; /* operand-size prefix: dec ecx rather than dec cx */
    *p++ = 0xff;     /* dec ecx */
    *p++ = 0xc9;
    *p++ = 0x75; /* jnz L */
    /* rel8 is relative to the end of the 2-byte jnz; p points at its operand */
    *p = (uint8_t)(int8_t)(-((int)(p + 1 - (mem + CODE_GPA))));
    p++;
    *p++ = 0xf4; /* hlt */

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap(kvm_run)");
    set_cpuid(kvm, vcpu);

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rflags = 0x2;
    regs.rip = CODE_GPA;
    regs.rcx = n;
    regs.rdx = PIO_PORT;
    regs.rax = 0xab;

    if (gm == REAL) {
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        /* MMIO: DS:BX = F000:0000 -> linear/physical 0xF0000 */
        sregs.ds.base = MMIO_GPA;
        sregs.ds.selector = MMIO_GPA >> 4;
        regs.rbx = 0;
    } else {
        flat_seg(&sregs.cs, 0x08, 0xb, gm == LONG);
        flat_seg(&sregs.ds, 0x10, 0x3, 0);
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        regs.rdi = MMIO_GPA;
        sregs.cr0 = 0x11; /* PE | ET */
        if (gm == LONG) {
            uint64_t *pml4 = (uint64_t *)(mem + PML4_GPA);
            uint64_t *pdpt = (uint64_t *)(mem + PDPT_GPA);
            uint64_t *pd = (uint64_t *)(mem + PD_GPA);
            pml4[0] = PDPT_GPA | 0x3; /* P | RW */
            pdpt[0] = PD_GPA | 0x3;
            pd[0] = 0x0 | 0x83; /* P | RW | PS: identity 2 MiB page */
            sregs.cr3 = PML4_GPA;
            sregs.cr4 = 0x20;             /* PAE */
            sregs.efer = 0x500;           /* LME | LMA */
            sregs.cr0 = 0x80000011;       /* PG | ET | PE */
        }
    }
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    struct rusage ru0, ru1;
    struct timespec t0, t1;
    unsigned long long exits = 0;
    /* The first exit pays one-off costs (NPT/shadow page faults, emulator set-up), so the
     * clock starts after it: the per-exit figures cover exits 2..N (all N exits if N == 1). */
    unsigned long long timed_from = n > 1 ? 1 : 0;
    getrusage(RUSAGE_SELF, &ru0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (exits == timed_from && timed_from) {
            getrusage(RUSAGE_SELF, &ru0);
            clock_gettime(CLOCK_MONOTONIC, &t0);
            timed_from = 0;
        }
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        if (!mmio && run->exit_reason == KVM_EXIT_IO) {
            if (run->io.direction != KVM_EXIT_IO_OUT || run->io.port != PIO_PORT ||
                run->io.size != 1 || run->io.count != 1)
                fail("unexpected PIO exit: dir=%u port=0x%x size=%u count=%u",
                     run->io.direction, run->io.port, run->io.size, run->io.count);
            if (*((uint8_t *)run + run->io.data_offset) != 0xab)
                fail("unexpected PIO data 0x%x", *((uint8_t *)run + run->io.data_offset));
            if (++exits == n && irqchip)
                break; /* the final hlt would not exit to userspace */
            continue;
        }
        if (mmio && run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write || run->mmio.phys_addr != MMIO_GPA || run->mmio.len != 1 ||
                run->mmio.data[0] != 0xab)
                fail("unexpected MMIO exit: write=%u gpa=0x%llx len=%u data0=0x%x",
                     run->mmio.is_write, (unsigned long long)run->mmio.phys_addr, run->mmio.len,
                     run->mmio.data[0]);
            if (++exits == n && irqchip)
                break;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_FAIL_ENTRY)
            fail("KVM_EXIT_FAIL_ENTRY hardware_entry_failure_reason=0x%llx",
                 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR)
            fail("KVM_EXIT_INTERNAL_ERROR suberror=%u ndata=%u", run->internal.suberror,
                 run->internal.ndata);
        struct kvm_regs r;
        ioctl(vcpu, KVM_GET_REGS, &r);
        fprintf(stderr, "kvm_exit_floor: guest rip=0x%llx rcx=%llu\n", (unsigned long long)r.rip,
                (unsigned long long)r.rcx);
        fail("unexpected exit_reason %u after %llu expected exits", run->exit_reason, exits);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    getrusage(RUSAGE_SELF, &ru1);

    if (exits != n)
        fail("guest halted after %llu exits, expected %llu", exits, n);

    const double timed = (double)(n > 1 ? n - 1 : 1);
    double wall = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    double user = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) * 1e9 +
                  (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) * 1e3;
    double sys = (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) * 1e9 +
                 (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) * 1e3;
    printf("mode=%s exits=%llu wall_ns_per_exit=%.0f user_ns_per_exit=%.0f "
           "sys_ns_per_exit=%.0f guest=%s%s\n",
           mmio ? "mmio" : "pio", exits, wall / timed, user / timed, sys / timed, gname,
           irqchip ? " irqchip=1" : "");
    return 0;
}
