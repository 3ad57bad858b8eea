/* Modern virtio-pci driver for the test guests. See virtio.h. */
#include "virtio.h"
#include "x86.h"

/* virtio_pci_common_cfg offsets (virtio 1.2, 4.1.4.3) */
enum { CC_DFSELECT = 0x00, CC_DF = 0x04, CC_GFSELECT = 0x08, CC_GF = 0x0C, CC_MSIX_CONFIG = 0x10,
       CC_NUM_QUEUES = 0x12, CC_STATUS = 0x14, CC_CFG_GEN = 0x15, CC_Q_SELECT = 0x16, CC_Q_SIZE = 0x18,
       CC_Q_MSIX = 0x1A, CC_Q_ENABLE = 0x1C, CC_Q_NOTIFY_OFF = 0x1E, CC_Q_DESC = 0x20, CC_Q_DRIVER = 0x28,
       CC_Q_DEVICE = 0x30 };
enum { CAP_COMMON = 1, CAP_NOTIFY = 2, CAP_ISR = 3, CAP_DEVICE = 4, CAP_PCI = 5 };

volatile uint32_t virtio_irq_count[VIRTIO_MAX_VECS];
uint32_t virtio_apic_id;

/* ---- small libc ---------------------------------------------------------- */

void *memset(void *d, int c, uint32_t n)
{
    uint8_t *p = d;
    while (n--)
        *p++ = (uint8_t)c;
    return d;
}
void *memcpy(void *d, const void *s, uint32_t n)
{
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}
int memcmp(const void *a, const void *b, uint32_t n)
{
    const uint8_t *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

/* ---- DMA memory: identity mapped, so guest addresses are bus addresses ---- */

static uint8_t dma_pool[192 * 1024] __attribute__((aligned(4096)));
static uint32_t dma_used;

void *dma_alloc(uint32_t size, uint32_t align)
{
    uint32_t a = (dma_used + align - 1) & ~(align - 1);
    if (a + size > sizeof(dma_pool)) {
        print("FAIL: dma pool exhausted (%u + %u bytes)\n", a, size);
        exit_vm(1);
    }
    dma_used = a + size;
    return memset(dma_pool + a, 0, size);
}
void dma_reset(void) { dma_used = 0; }

static uint64_t phys(const void *p) { return (uint64_t)(uintptr_t)p; }

/* ---- interrupts ------------------------------------------------------------ */

uint32_t virtio_lapic_init(void)
{
    virtio_apic_id = lapic_enable(VIRTIO_WATCHDOG_VEC);
    return virtio_apic_id;
}

void virtio_irq(uint32_t vector)
{
    if (vector >= VIRTIO_VEC_BASE && vector < VIRTIO_VEC_BASE + VIRTIO_MAX_VECS)
        virtio_irq_count[vector - VIRTIO_VEC_BASE]++;
}

/* ---- common configuration --------------------------------------------------- */

static uint8_t cc_r8(const struct virtio_dev *d, uint32_t o) { return mmio_read8(d->common + o); }
static uint16_t cc_r16(const struct virtio_dev *d, uint32_t o) { return mmio_read16(d->common + o); }
static uint32_t cc_r32(const struct virtio_dev *d, uint32_t o) { return mmio_read32(d->common + o); }
static void cc_w8(const struct virtio_dev *d, uint32_t o, uint8_t v) { mmio_write8(d->common + o, v); }
static void cc_w16(const struct virtio_dev *d, uint32_t o, uint16_t v) { mmio_write16(d->common + o, v); }
static void cc_w32(const struct virtio_dev *d, uint32_t o, uint32_t v) { mmio_write32(d->common + o, v); }
static void cc_w64(const struct virtio_dev *d, uint32_t o, uint64_t v)
{
    cc_w32(d, o, (uint32_t)v);
    cc_w32(d, o + 4, (uint32_t)(v >> 32));
}

uint8_t virtio_status(struct virtio_dev *d) { return cc_r8(d, CC_STATUS); }
int virtio_has(const struct virtio_dev *d, uint32_t bit) { return (d->negotiated >> bit) & 1; }

uint8_t virtio_cfg8(const struct virtio_dev *d, uint32_t off) { return mmio_read8(d->devcfg + off); }
uint16_t virtio_cfg16(const struct virtio_dev *d, uint32_t off) { return mmio_read16(d->devcfg + off); }
uint32_t virtio_cfg32(const struct virtio_dev *d, uint32_t off) { return mmio_read32(d->devcfg + off); }
uint64_t virtio_cfg64(const struct virtio_dev *d, uint32_t off)
{
    uint64_t v = 0;
    for (int i = 0; i < 5; i++) {
        uint8_t gen = cc_r8(d, CC_CFG_GEN);
        v = virtio_cfg32(d, off) | (uint64_t)virtio_cfg32(d, off + 4) << 32;
        if (cc_r8(d, CC_CFG_GEN) == gen)
            break;
    }
    return v;
}

static int fail(struct virtio_dev *d, const char *err, uint32_t val)
{
    d->err = err;
    d->err_val = val;
    return 0;
}

static const char *const cap_names[] = { "?", "common", "notify", "isr", "device", "pci-cfg", "shm", "vendor" };

static int map_caps(struct virtio_dev *d)
{
    const struct pci_func *f = d->pf;
    for (uint8_t c = pci_find_cap(f, PCI_CAP_VENDOR, 0); c; c = pci_find_cap(f, PCI_CAP_VENDOR, c)) {
        uint8_t type = pci_read8(f, c + 3u), bar = pci_read8(f, c + 4u), len = pci_read8(f, c + 2u);
        uint32_t off = pci_read32(f, c + 8u), length = pci_read32(f, c + 12u);
        print("%s: virtio cap at 0x%x: %s (type %u) bar %u offset 0x%x length 0x%x", d->name, c,
              type < 8 ? cap_names[type] : "?", type, bar, off, length);
        if (type == CAP_NOTIFY && len >= 20)
            print(" notify_off_multiplier %u", pci_read32(f, c + 16u));
        print("\n");
        if (type == CAP_PCI) {
            d->has_pcicfg = 1;
            continue;
        }
        uintptr_t a = pci_bar_addr(f, bar, off, length);
        if (!a)
            continue; /* e.g. shared memory or a BAR we cannot reach: try the next one */
        if (type == CAP_COMMON && !d->common && length >= 0x38)
            d->common = a;
        else if (type == CAP_NOTIFY && !d->notify && len >= 20) {
            d->notify = a;
            d->notify_mult = pci_read32(f, c + 16u);
        } else if (type == CAP_ISR && !d->isr)
            d->isr = a;
        else if (type == CAP_DEVICE && !d->devcfg) {
            d->devcfg = a;
            d->devcfg_len = length;
        }
    }
    if (!d->common)
        return fail(d, "no usable common cfg capability", 0);
    if (!d->notify)
        return fail(d, "no usable notify capability", 0);
    if (!d->isr)
        return fail(d, "no usable isr capability", 0);
    return 1;
}

static int setup_msix(struct virtio_dev *d)
{
    const struct pci_func *f = d->pf;
    struct pci_msix m;
    int reachable = pci_msix_find(f, &m);
    if (!m.cap)
        return fail(d, "no msi-x capability", 0);
    d->msix_cap = m.cap;
    d->msix_size = m.size;
    d->msix_table = m.table;
    print("%s: msi-x cap at 0x%x: %u entries, table bar %u offset 0x%x, pba 0x%x\n", d->name, m.cap, m.size,
          m.table_reg & 7, m.table_reg & ~7u, m.pba_reg);
    if (!reachable)
        return fail(d, "msi-x table not in a reachable memory bar", m.table_reg);
    pci_msix_enable(f, &m, m.size < VIRTIO_MAX_VECS ? m.size : VIRTIO_MAX_VECS, virtio_apic_id, VIRTIO_VEC_BASE);
    return 1;
}

void virtio_reset(struct virtio_dev *d)
{
    cc_w8(d, CC_STATUS, 0);
    for (int i = 0; i < 10000 && cc_r8(d, CC_STATUS) != 0; i++)
        cpu_relax();
}

int virtio_init(struct virtio_dev *d, const struct pci_func *f, const char *name, uint64_t wanted)
{
    memset(d, 0, sizeof(*d));
    d->pf = f;
    d->name = name;
    pci_enable(f, 0);
    if (!map_caps(d))
        return 0;
    if (!setup_msix(d))
        return 0;
    virtio_reset(d);
    if (cc_r8(d, CC_STATUS) != 0)
        return fail(d, "device status not 0 after reset", cc_r8(d, CC_STATUS));
    cc_w8(d, CC_STATUS, VIRTIO_STATUS_ACK);
    cc_w8(d, CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
    cc_w32(d, CC_DFSELECT, 0);
    uint32_t lo = cc_r32(d, CC_DF);
    cc_w32(d, CC_DFSELECT, 1);
    uint32_t hi = cc_r32(d, CC_DF);
    d->offered = (uint64_t)hi << 32 | lo;
    d->negotiated = d->offered & (wanted | VIRTIO_F(VIRTIO_F_VERSION_1));
    if (!virtio_has(d, VIRTIO_F_VERSION_1))
        return fail(d, "device does not offer VIRTIO_F_VERSION_1", hi);
    cc_w32(d, CC_GFSELECT, 0);
    cc_w32(d, CC_GF, (uint32_t)d->negotiated);
    cc_w32(d, CC_GFSELECT, 1);
    cc_w32(d, CC_GF, (uint32_t)(d->negotiated >> 32));
    cc_w8(d, CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    uint8_t st = cc_r8(d, CC_STATUS);
    if (!(st & VIRTIO_STATUS_FEATURES_OK))
        return fail(d, "device cleared FEATURES_OK", st);
    d->num_queues = cc_r16(d, CC_NUM_QUEUES);
    cc_w16(d, CC_MSIX_CONFIG, 0);
    uint16_t v = cc_r16(d, CC_MSIX_CONFIG);
    if (v != 0)
        return fail(d, "config_msix_vector did not take entry 0", v);
    return 1;
}

static uint16_t pow2_floor(uint16_t v)
{
    uint16_t p = 1;
    while ((uint16_t)(p << 1) && (uint16_t)(p << 1) <= v)
        p = (uint16_t)(p << 1);
    return p;
}

int virtio_setup_queue(struct virtio_dev *d, uint16_t qi, uint16_t max_size)
{
    if (qi >= VQ_MAX_QUEUES || qi >= d->num_queues)
        return fail(d, "queue index beyond num_queues", d->num_queues);
    struct virtq *q = &d->vq[qi];
    memset(q, 0, sizeof(*q));
    cc_w16(d, CC_Q_SELECT, qi);
    uint16_t dev_size = cc_r16(d, CC_Q_SIZE);
    if (dev_size == 0)
        return fail(d, "queue_size is 0", qi);
    if (cc_r16(d, CC_Q_ENABLE))
        return fail(d, "queue_enable set before setup", qi);
    if (max_size > VQ_MAX_SIZE)
        max_size = VQ_MAX_SIZE;
    q->size = pow2_floor(dev_size < max_size ? dev_size : max_size);
    q->index = qi;
    cc_w16(d, CC_Q_SIZE, q->size);
    q->desc = dma_alloc(16u * q->size, 4096);
    q->avail = dma_alloc(6u + 2u * q->size, 4096);
    q->used = dma_alloc(6u + 8u * q->size, 4096);
    q->indirect = dma_alloc(16u * VQ_MAX_INDIRECT * q->size, 16);
    for (uint16_t i = 0; i < q->size; i++)
        q->desc[i].next = (uint16_t)(i + 1);
    q->num_free = q->size;
    cc_w64(d, CC_Q_DESC, phys(q->desc));
    cc_w64(d, CC_Q_DRIVER, phys((const void *)q->avail));
    cc_w64(d, CC_Q_DEVICE, phys((const void *)q->used));
    /* Entry 1 + qi; queues share the last entry when the table is smaller (virtio-serial-pci has 2). */
    uint16_t entry = (uint16_t)(1 + qi < d->msix_size ? 1 + qi : d->msix_size - 1);
    if (entry >= VIRTIO_MAX_VECS)
        entry = VIRTIO_MAX_VECS - 1;
    cc_w16(d, CC_Q_MSIX, entry);
    q->vector = cc_r16(d, CC_Q_MSIX);
    q->event_idx = (uint8_t)virtio_has(d, VIRTIO_F_EVENT_IDX);
    if (q->vector != entry)
        return fail(d, "queue_msix_vector not accepted", q->vector);
    q->notify_addr = d->notify + (uintptr_t)cc_r16(d, CC_Q_NOTIFY_OFF) * d->notify_mult;
    cc_w16(d, CC_Q_ENABLE, 1);
    print("%s: queue %u: size %u (device max %u), msi-x entry %u (vector 0x%x), notify at 0x%x\n", d->name, qi,
          q->size, dev_size, q->vector, VIRTIO_VEC_BASE + q->vector, q->notify_addr);
    return 1;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    cc_w8(d, CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
                            VIRTIO_STATUS_DRIVER_OK);
}

/* ---- feature names ---------------------------------------------------------- */

struct fname { uint8_t type, bit; const char *name; };
static const struct fname fnames[] = {
    { 0, 28, "RING_INDIRECT_DESC" }, { 0, 29, "RING_EVENT_IDX" }, { 0, 32, "VERSION_1" },
    { 0, 33, "ACCESS_PLATFORM" }, { 0, 34, "RING_PACKED" }, { 0, 35, "IN_ORDER" }, { 0, 36, "ORDER_PLATFORM" },
    { 0, 37, "SR_IOV" }, { 0, 38, "NOTIFICATION_DATA" }, { 0, 24, "NOTIFY_ON_EMPTY" }, { 0, 27, "ANY_LAYOUT" },
    { 0, 40, "RING_RESET" },
    { 1, 0, "CSUM" }, { 1, 1, "GUEST_CSUM" }, { 1, 2, "CTRL_GUEST_OFFLOADS" }, { 1, 3, "MTU" }, { 1, 5, "MAC" },
    { 1, 6, "GSO" }, { 1, 7, "GUEST_TSO4" }, { 1, 8, "GUEST_TSO6" }, { 1, 9, "GUEST_ECN" }, { 1, 10, "GUEST_UFO" },
    { 1, 11, "HOST_TSO4" }, { 1, 12, "HOST_TSO6" }, { 1, 13, "HOST_ECN" }, { 1, 14, "HOST_UFO" },
    { 1, 15, "MRG_RXBUF" }, { 1, 16, "STATUS" }, { 1, 17, "CTRL_VQ" }, { 1, 18, "CTRL_RX" }, { 1, 19, "CTRL_VLAN" },
    { 1, 21, "GUEST_ANNOUNCE" }, { 1, 22, "MQ" }, { 1, 23, "CTRL_MAC_ADDR" },
    { 2, 1, "SIZE_MAX" }, { 2, 2, "SEG_MAX" }, { 2, 4, "GEOMETRY" }, { 2, 5, "RO" }, { 2, 6, "BLK_SIZE" },
    { 2, 9, "FLUSH" }, { 2, 10, "TOPOLOGY" }, { 2, 11, "CONFIG_WCE" }, { 2, 12, "MQ" }, { 2, 13, "DISCARD" },
    { 2, 14, "WRITE_ZEROES" }, { 2, 15, "LIFETIME" }, { 2, 16, "SECURE_ERASE" },
    { 3, 0, "SIZE" }, { 3, 1, "MULTIPORT" }, { 3, 2, "EMERG_WRITE" },
};

void virtio_print_features(const char *what, uint64_t f, uint32_t type)
{
    print("%s 0x%X:", what, f);
    for (uint32_t bit = 0; bit < 64; bit++) {
        if (!((f >> bit) & 1))
            continue;
        const char *n = 0;
        for (uint32_t i = 0; i < sizeof(fnames) / sizeof(fnames[0]) && !n; i++)
            if (fnames[i].bit == bit && (fnames[i].type == 0 ? bit >= 24 && bit < 50 : fnames[i].type == type))
                n = fnames[i].name;
        if (n)
            print(" %s", n);
        else
            print(" bit%u", bit);
    }
    print("\n");
}

/* ---- split virtqueue ------------------------------------------------------- */

static volatile uint16_t *used_idx(struct virtq *q) { return (volatile uint16_t *)(q->used + 2); }


int vq_add(struct virtq *q, const struct vq_buf *bufs, int n, int indirect, void *cookie)
{
    int need = indirect ? 1 : n;
    if (n < 1 || q->num_free < need || (indirect && n > VQ_MAX_INDIRECT))
        return -1;
    uint16_t head = q->free_head, i = head;
    if (indirect) {
        struct vq_desc *t = &q->indirect[head * VQ_MAX_INDIRECT];
        for (int k = 0; k < n; k++) {
            t[k].addr = phys(bufs[k].addr);
            t[k].len = bufs[k].len;
            t[k].flags = (uint16_t)((bufs[k].write ? VQ_DESC_F_WRITE : 0) | (k + 1 < n ? VQ_DESC_F_NEXT : 0));
            t[k].next = (uint16_t)(k + 1 < n ? k + 1 : 0);
        }
        q->desc[head].addr = phys(t);
        q->desc[head].len = 16u * (uint32_t)n;
        q->desc[head].flags = VQ_DESC_F_INDIRECT;
        q->free_head = q->desc[head].next;
    } else {
        for (int k = 0; k < n; k++) {
            struct vq_desc *dd = &q->desc[i];
            dd->addr = phys(bufs[k].addr);
            dd->len = bufs[k].len;
            dd->flags = (uint16_t)((bufs[k].write ? VQ_DESC_F_WRITE : 0) | (k + 1 < n ? VQ_DESC_F_NEXT : 0));
            i = dd->next;
        }
        q->free_head = i; /* the free list continues after the chain's last descriptor */
    }
    q->num_free = (uint16_t)(q->num_free - need);
    q->cookie[head] = cookie;
    q->avail[2 + (q->avail_idx % q->size)] = head;
    q->avail_idx++;
    return head;
}

void vq_kick(struct virtq *q)
{
    barrier();
    q->avail[1] = q->avail_idx; /* publish */
    mb();                       /* idx visible before we read the device's suppression state */
    uint16_t old = q->kicked_idx, now = q->avail_idx;
    int need;
    if (q->event_idx) {         /* notify iff avail_event lies in [old, now) */
        uint16_t ev = *(volatile uint16_t *)(q->used + 4 + 8u * q->size);
        need = (uint16_t)(now - ev - 1) < (uint16_t)(now - old);
    } else {
        need = !(*(volatile uint16_t *)q->used & 1); /* VIRTQ_USED_F_NO_NOTIFY */
    }
    q->kicked_idx = now;
    if (need) {
        mmio_write16(q->notify_addr, q->index);
        q->notifies++;
    } else {
        q->suppressed++;
    }
}

int vq_get_used(struct virtq *q, uint32_t *len, void **cookie)
{
    if (*used_idx(q) == q->last_used)
        return -1;
    barrier();
    const volatile uint32_t *e = (const volatile uint32_t *)(q->used + 4 + 8u * (q->last_used % q->size));
    uint32_t id = e[0], l = e[1];
    q->last_used++;
    if (q->event_idx)
        q->avail[2 + q->size] = q->last_used; /* used_event: interrupt on the next completion */
    if (id >= q->size)
        return -2;
    if (len)
        *len = l;
    if (cookie)
        *cookie = q->cookie[id];
    uint16_t i = (uint16_t)id, n = 1;
    while ((q->desc[i].flags & VQ_DESC_F_NEXT) && n < q->size)
        i = q->desc[i].next, n++;
    q->desc[i].next = q->free_head;
    q->free_head = (uint16_t)id;
    q->num_free = (uint16_t)(q->num_free + n);
    return (int)id;
}

#define WATCHDOG_COUNT 625000u /* 10 ms at the 1 GHz APIC bus of KVM and QEMU (divide by 16) */

/*
 * Polling: spin on the used ring.  With use_irq: halt (IF=0, then "sti; hlt")
 * until both the used element and the queue's MSI-X interrupt are there; a
 * one-shot LAPIC timer (watchdog vector) bounds every hlt, so a lost interrupt
 * ends in a timeout, never a hang.  Halting matters under emulation too: QEMU
 * delivers the MSI from its main loop, which a spinning vCPU can starve.
 * Once the used element is there, the interrupt gets 100 ms more.
 */
int vq_wait(struct virtq *q, uint32_t ms, int use_irq, uint32_t *len, void **cookie)
{
    uint32_t vec = q->vector < VIRTIO_MAX_VECS ? q->vector : 0, seen = virtio_irq_count[vec];
    struct deadline dl;
    int head = -1;
    use_irq = use_irq && q->vector < VIRTIO_MAX_VECS;
    irq_off();
    dl_start_ms(&dl, ms);
    for (;;) {
        if (head == -1) {
            head = vq_get_used(q, len, cookie);
            if (head != -1 && use_irq && virtio_irq_count[vec] == seen)
                dl_start_ms(&dl, 100); /* completion seen: the interrupt gets 100 ms more */
        }
        if (head != -1 && (!use_irq || virtio_irq_count[vec] != seen))
            break;
        if (dl_expired(&dl))
            break;
        if (use_irq) {
            lapic_write(LAPIC_TMR_INIT, WATCHDOG_COUNT);
            halt_for_irq();
        } else {
            cpu_relax();
        }
    }
    if (use_irq) {
        lapic_write(LAPIC_TMR_INIT, 0);
        q->irq_waits++;
        if (virtio_irq_count[vec] != seen)
            q->irq_seen++;
    }
    return head < 0 ? -1 : head;
}
