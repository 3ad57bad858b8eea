/*
 * A small modern (virtio 1.x, non-transitional) virtio-pci driver for the test
 * guests: vendor capabilities mapped from the BARs, status/feature handshake,
 * split virtqueues (direct and indirect descriptors, EVENT_IDX notification
 * suppression), notification through the notify capability, MSI-X vectors
 * programmed into the device's table, and completion waits that either poll
 * the used ring or halt until the queue's MSI-X interrupt arrives.  Every wait
 * is bounded by a PIT channel 2 deadline.
 *
 * Interrupt vectors: VIRTIO_VEC_BASE + MSI-X table entry (entry 0 = config
 * change, entry 1 + q = queue q); the guest's interrupt handler must call
 * virtio_irq(vector) for them and also EOI the watchdog vector (a one-shot
 * LAPIC timer that bounds every hlt).
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include <stdint.h>
#include "pci.h"

#define VIRTIO_VENDOR 0x1AF4
#define VIRTIO_PCI_DEVICE(type) (0x1040 + (type))
enum { VIRTIO_ID_NET = 1, VIRTIO_ID_BLK = 2, VIRTIO_ID_CONSOLE = 3, VIRTIO_ID_RNG = 4 };

#define VIRTIO_F(bit) (1ull << (bit))
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

enum { VIRTIO_STATUS_ACK = 1, VIRTIO_STATUS_DRIVER = 2, VIRTIO_STATUS_DRIVER_OK = 4,
       VIRTIO_STATUS_FEATURES_OK = 8, VIRTIO_STATUS_NEEDS_RESET = 64, VIRTIO_STATUS_FAILED = 128 };

#define VIRTIO_VEC_BASE 0x50 /* 0x50 config, 0x51 + q for queue q */
#define VIRTIO_MAX_VECS 16
#define VIRTIO_WATCHDOG_VEC 0x4F
#define VIRTIO_NO_VECTOR 0xFFFF

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_DESC_F_INDIRECT 4
#define VQ_MAX_SIZE 32
#define VQ_MAX_INDIRECT 8
#define VQ_MAX_QUEUES 2

struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

struct vq_buf {
    const void *addr;
    uint32_t len;
    int write; /* device writes this buffer */
};

struct virtq {
    uint16_t index, size, vector; /* vector: MSI-X table entry, VIRTIO_NO_VECTOR if none */
    struct vq_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[size], used_event */
    volatile uint8_t *used;   /* le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event */
    struct vq_desc *indirect; /* VQ_MAX_INDIRECT entries per head */
    uint16_t free_head, num_free, avail_idx, last_used, kicked_idx;
    uint8_t event_idx;
    uintptr_t notify_addr;
    uint32_t notifies, suppressed, irq_waits, irq_seen; /* statistics */
    void *cookie[VQ_MAX_SIZE];
};

struct virtio_dev {
    const struct pci_func *pf;
    const char *name;
    uintptr_t common, notify, isr, devcfg;
    uint32_t notify_mult, devcfg_len;
    uint8_t has_pcicfg, msix_cap;
    uint16_t msix_size, num_queues;
    uintptr_t msix_table;
    uint64_t offered, negotiated;
    struct virtq vq[VQ_MAX_QUEUES];
    const char *err; /* set when a call returns 0 */
    uint32_t err_val;
};

extern volatile uint32_t virtio_irq_count[VIRTIO_MAX_VECS];
extern uint32_t virtio_apic_id;

/* LAPIC on (SVR 0x1FF, TPR 0), its timer as a masked-until-armed one-shot on
 * VIRTIO_WATCHDOG_VEC; returns the APIC ID used as the MSI destination. */
uint32_t virtio_lapic_init(void);
void virtio_irq(uint32_t vector);

/* Reset, ACK, DRIVER, features (offered & wanted; VERSION_1 required),
 * FEATURES_OK, MSI-X table and config vector.  Returns 1 on success. */
int virtio_init(struct virtio_dev *d, const struct pci_func *f, const char *name, uint64_t wanted);
/* Queue qi with at most max_size entries, MSI-X entry 1 + qi (or the table's last entry). */
int virtio_setup_queue(struct virtio_dev *d, uint16_t qi, uint16_t max_size);
void virtio_driver_ok(struct virtio_dev *d);
void virtio_reset(struct virtio_dev *d);
uint8_t virtio_status(struct virtio_dev *d);
int virtio_has(const struct virtio_dev *d, uint32_t bit);
void virtio_print_features(const char *what, uint64_t f, uint32_t type);

uint8_t virtio_cfg8(const struct virtio_dev *d, uint32_t off);
uint16_t virtio_cfg16(const struct virtio_dev *d, uint32_t off);
uint32_t virtio_cfg32(const struct virtio_dev *d, uint32_t off);
uint64_t virtio_cfg64(const struct virtio_dev *d, uint32_t off); /* retried over config_generation */

/* Queue a chain (indirect: one descriptor pointing at a table); returns the head or -1. */
int vq_add(struct virtq *q, const struct vq_buf *bufs, int n, int indirect, void *cookie);
/* Publish to the device and notify it unless the device suppressed it. */
void vq_kick(struct virtq *q);
/* Next used element (head, frees its chain) or -1. */
int vq_get_used(struct virtq *q, uint32_t *len, void **cookie);
/* Wait up to ms for a used element; with use_irq, halt until the queue's MSI-X
 * vector fires (q->irq_seen counts waits that saw it).  Returns head or -1. */
int vq_wait(struct virtq *q, uint32_t ms, int use_irq, uint32_t *len, void **cookie);

void *dma_alloc(uint32_t size, uint32_t align);
void dma_reset(void);

void *memset(void *d, int c, uint32_t n);
void *memcpy(void *d, const void *s, uint32_t n);
int memcmp(const void *a, const void *b, uint32_t n);

#endif
