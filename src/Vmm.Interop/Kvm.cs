// Declarations from <linux/kvm.h> (x86-64), kept under their C names so they can be grepped against the
// header. Sizes and offsets are checked against the real header by tests/Vmm.Tests/Abi (a compiled C probe).
using System.Runtime.InteropServices;

namespace Vmm.Interop;

#pragma warning disable IDE1006 // C names on purpose
#pragma warning disable CS0649  // fields are written by the kernel

/// <summary>ioctl request numbers, exit reasons, capabilities and constants of the KVM uapi.</summary>
public static class KvmConstants
{
    public const int KVM_API_VERSION = 12;

    // ioctls on /dev/kvm
    public const uint KVM_GET_API_VERSION = 0xAE00;
    public const uint KVM_CREATE_VM = 0xAE01;
    public const uint KVM_CHECK_EXTENSION = 0xAE03;
    public const uint KVM_GET_VCPU_MMAP_SIZE = 0xAE04;
    public const uint KVM_GET_SUPPORTED_CPUID = 0xC008AE05;   // _IOWR(KVMIO, 0x05, struct kvm_cpuid2)

    // ioctls on a VM fd
    public const uint KVM_CREATE_VCPU = 0xAE41;
    public const uint KVM_SET_USER_MEMORY_REGION = 0x4020AE46; // _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
    public const uint KVM_SET_TSS_ADDR = 0xAE47;
    public const uint KVM_SET_IDENTITY_MAP_ADDR = 0x4008AE48;  // _IOW(KVMIO, 0x48, __u64)
    public const uint KVM_CREATE_IRQCHIP = 0xAE60;
    public const uint KVM_IRQ_LINE = 0x4008AE61;               // _IOW(KVMIO, 0x61, struct kvm_irq_level)
    public const uint KVM_CREATE_PIT2 = 0x4040AE77;            // _IOW(KVMIO, 0x77, struct kvm_pit_config)
    public const uint KVM_SET_GSI_ROUTING = 0x4008AE6A;        // _IOW(KVMIO, 0x6a, struct kvm_irq_routing)
    public const uint KVM_IRQFD = 0x4020AE76;                  // _IOW(KVMIO, 0x76, struct kvm_irqfd)
    public const uint KVM_IOEVENTFD = 0x4040AE79;              // _IOW(KVMIO, 0x79, struct kvm_ioeventfd)
    public const uint KVM_SIGNAL_MSI = 0x4020AEA5;             // _IOW(KVMIO, 0xa5, struct kvm_msi)

    // ioctls on a vCPU fd
    public const uint KVM_RUN = 0xAE80;
    public const uint KVM_GET_REGS = 0x8090AE81;               // _IOR(KVMIO, 0x81, struct kvm_regs)
    public const uint KVM_SET_REGS = 0x4090AE82;
    public const uint KVM_GET_SREGS = 0x8138AE83;              // _IOR(KVMIO, 0x83, struct kvm_sregs)
    public const uint KVM_SET_SREGS = 0x4138AE84;
    public const uint KVM_GET_MSRS = 0xC008AE88;               // _IOWR(KVMIO, 0x88, struct kvm_msrs)
    public const uint KVM_SET_MSRS = 0x4008AE89;
    public const uint KVM_GET_FPU = 0x81A0AE8C;                // _IOR(KVMIO, 0x8c, struct kvm_fpu)
    public const uint KVM_SET_FPU = 0x41A0AE8D;
    public const uint KVM_SET_CPUID2 = 0x4008AE90;             // _IOW(KVMIO, 0x90, struct kvm_cpuid2)
    public const uint KVM_KVMCLOCK_CTRL = 0xAEAD;              // _IO(KVMIO, 0xad)
    public const uint KVM_GET_MP_STATE = 0x8004AE98;           // _IOR(KVMIO, 0x98, struct kvm_mp_state)
    public const uint KVM_SET_MP_STATE = 0x4004AE99;

    // capabilities (KVM_CHECK_EXTENSION)
    public const int KVM_CAP_IRQCHIP = 0;
    public const int KVM_CAP_HLT = 1;
    public const int KVM_CAP_USER_MEMORY = 3;
    public const int KVM_CAP_SET_TSS_ADDR = 4;
    public const int KVM_CAP_EXT_CPUID = 7;
    public const int KVM_CAP_NR_VCPUS = 9;
    public const int KVM_CAP_NR_MEMSLOTS = 10;
    public const int KVM_CAP_MP_STATE = 14;
    public const int KVM_CAP_PIT2 = 33;
    public const int KVM_CAP_SET_IDENTITY_MAP_ADDR = 37;
    public const int KVM_CAP_MAX_VCPUS = 66;
    public const int KVM_CAP_IMMEDIATE_EXIT = 136;
    public const int KVM_CAP_IRQ_ROUTING = 25;
    public const int KVM_CAP_IRQFD = 32;
    public const int KVM_CAP_IOEVENTFD = 36;
    public const int KVM_CAP_IRQFD_RESAMPLE = 82;
    public const int KVM_CAP_SIGNAL_MSI = 77;

    public const uint KVM_IRQ_ROUTING_IRQCHIP = 1;
    public const uint KVM_IRQ_ROUTING_MSI = 2;
    public const uint KVM_IRQCHIP_PIC_MASTER = 0;
    public const uint KVM_IRQCHIP_PIC_SLAVE = 1;
    public const uint KVM_IRQCHIP_IOAPIC = 2;

    public const uint KVM_IRQFD_FLAG_DEASSIGN = 1;
    public const uint KVM_IRQFD_FLAG_RESAMPLE = 2;

    public const uint KVM_IOEVENTFD_FLAG_DATAMATCH = 1;
    public const uint KVM_IOEVENTFD_FLAG_PIO = 2;
    public const uint KVM_IOEVENTFD_FLAG_DEASSIGN = 4;

    // kvm_run.exit_reason
    public const uint KVM_EXIT_UNKNOWN = 0;
    public const uint KVM_EXIT_EXCEPTION = 1;
    public const uint KVM_EXIT_IO = 2;
    public const uint KVM_EXIT_HYPERCALL = 3;
    public const uint KVM_EXIT_DEBUG = 4;
    public const uint KVM_EXIT_HLT = 5;
    public const uint KVM_EXIT_MMIO = 6;
    public const uint KVM_EXIT_IRQ_WINDOW_OPEN = 7;
    public const uint KVM_EXIT_SHUTDOWN = 8;
    public const uint KVM_EXIT_FAIL_ENTRY = 9;
    public const uint KVM_EXIT_INTR = 10;
    public const uint KVM_EXIT_NMI = 16;
    public const uint KVM_EXIT_INTERNAL_ERROR = 17;
    public const uint KVM_EXIT_SYSTEM_EVENT = 24;

    public const byte KVM_EXIT_IO_IN = 0;
    public const byte KVM_EXIT_IO_OUT = 1;

    public const uint KVM_SYSTEM_EVENT_SHUTDOWN = 1;
    public const uint KVM_SYSTEM_EVENT_RESET = 2;
    public const uint KVM_SYSTEM_EVENT_CRASH = 3;

    public const uint KVM_MP_STATE_RUNNABLE = 0;
    public const uint KVM_MP_STATE_UNINITIALIZED = 1;
    public const uint KVM_MP_STATE_HALTED = 3;

    public const uint KVM_PIT_SPEAKER_DUMMY = 1;

    // KVM device API (the KVM VFIO pseudo device: KVM learns which VFIO groups/cdevs the VM uses, for cache
    // coherency (NoSnoop) and vendor drivers that need the kvm pointer, e.g. NVIDIA vGPU, Intel GVT-g).
    public const int KVM_CAP_DEVICE_CTRL = 89;
    public const uint KVM_CREATE_DEVICE = 0xC00CAEE0;          // _IOWR(KVMIO, 0xe0, struct kvm_create_device)
    public const uint KVM_SET_DEVICE_ATTR = 0x4018AEE1;        // _IOW(KVMIO, 0xe1, struct kvm_device_attr)
    public const uint KVM_HAS_DEVICE_ATTR = 0x4018AEE3;        // _IOW(KVMIO, 0xe3, struct kvm_device_attr)
    public const uint KVM_DEV_TYPE_VFIO = 4;
    // Linux 6.6 renamed these KVM_DEV_VFIO_FILE, KVM_DEV_VFIO_FILE_ADD and KVM_DEV_VFIO_FILE_DEL (same values) when
    // they began to accept a VFIO device cdev fd as well as a group fd; the installed 6.1 headers have these names.
    public const uint KVM_DEV_VFIO_GROUP = 1;
    public const ulong KVM_DEV_VFIO_GROUP_ADD = 1;
    public const ulong KVM_DEV_VFIO_GROUP_DEL = 2;
}

/// <summary>Byte offsets into the mmapped <c>struct kvm_run</c>. The exit path reads these through a span,
/// so no managed struct is copied per exit.</summary>
public static class KvmRunOffsets
{
    public const int request_interrupt_window = 0;
    public const int immediate_exit = 1;
    public const int exit_reason = 8;
    public const int ready_for_interrupt_injection = 12;
    public const int if_flag = 13;
    public const int flags = 14;
    public const int cr8 = 16;
    public const int apic_base = 24;
    /// <summary>Start of the exit-specific union.</summary>
    public const int exit_union = 32;

    public const int io_direction = 32;
    public const int io_size = 33;
    public const int io_port = 34;
    public const int io_count = 36;
    public const int io_data_offset = 40;

    public const int mmio_phys_addr = 32;
    public const int mmio_data = 40;
    public const int mmio_len = 48;
    public const int mmio_is_write = 52;

    public const int hw_hardware_exit_reason = 32;
    public const int fail_entry_hardware_entry_failure_reason = 32;
    public const int fail_entry_cpu = 40;
    public const int ex_exception = 32;
    public const int ex_error_code = 36;
    public const int internal_suberror = 32;
    public const int internal_ndata = 36;
    public const int internal_data = 40;
    public const int system_event_type = 32;
    public const int system_event_ndata = 36;
    public const int system_event_data = 40;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_userspace_memory_region
{
    public uint slot;
    public uint flags;
    public ulong guest_phys_addr;
    public ulong memory_size;
    public ulong userspace_addr;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_regs
{
    public ulong rax, rbx, rcx, rdx;
    public ulong rsi, rdi, rsp, rbp;
    public ulong r8, r9, r10, r11;
    public ulong r12, r13, r14, r15;
    public ulong rip, rflags;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_segment
{
    public ulong @base;
    public uint limit;
    public ushort selector;
    public byte type;
    public byte present, dpl, db, s, l, g, avl;
    public byte unusable;
    public byte padding;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_dtable
{
    public ulong @base;
    public ushort limit;
    public fixed ushort padding[3];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_sregs
{
    public kvm_segment cs, ds, es, fs, gs, ss;
    public kvm_segment tr, ldt;
    public kvm_dtable gdt, idt;
    public ulong cr0, cr2, cr3, cr4, cr8;
    public ulong efer;
    public ulong apic_base;
    public fixed ulong interrupt_bitmap[4]; // (KVM_NR_INTERRUPTS + 63) / 64
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_fpu
{
    public fixed byte fpr[128];  // [8][16]
    public ushort fcw;
    public ushort fsw;
    public byte ftwx;
    public byte pad1;
    public ushort last_opcode;
    public ulong last_ip;
    public ulong last_dp;
    public fixed byte xmm[256];  // [16][16]
    public uint mxcsr;
    public uint pad2;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_msr_entry
{
    public uint index;
    public uint reserved;
    public ulong data;
}

/// <summary>Header of <c>struct kvm_msrs</c>; <c>nmsrs</c> entries of <see cref="kvm_msr_entry"/> follow.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct kvm_msrs
{
    public uint nmsrs;
    public uint pad;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_cpuid_entry2
{
    public uint function;
    public uint index;
    public uint flags;
    public uint eax, ebx, ecx, edx;
    public fixed uint padding[3];
}

/// <summary>Header of <c>struct kvm_cpuid2</c>; <c>nent</c> entries of <see cref="kvm_cpuid_entry2"/> follow.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct kvm_cpuid2
{
    public uint nent;
    public uint padding;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_mp_state
{
    public uint mp_state;
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_irq_level
{
    public uint irq;    // union { __u32 irq; __s32 status; }
    public uint level;
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_pit_config
{
    public uint flags;
    public fixed uint pad[15];
}

/// <summary>Header of <c>struct kvm_irq_routing</c>; <c>nr</c> entries of <see cref="kvm_irq_routing_entry"/> follow.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct kvm_irq_routing
{
    public uint nr;
    public uint flags;
}

/// <summary><c>struct kvm_irq_routing_entry</c>. The union <c>u</c> is 32 bytes: for KVM_IRQ_ROUTING_IRQCHIP
/// u[0] = irqchip, u[1] = pin; for KVM_IRQ_ROUTING_MSI u[0] = address_lo, u[1] = address_hi, u[2] = data.</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_irq_routing_entry
{
    public uint gsi;
    public uint type;
    public uint flags;
    public uint pad;
    public fixed uint u[8];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_irqfd
{
    public uint fd;
    public uint gsi;
    public uint flags;
    public uint resamplefd;
    public fixed byte pad[16];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_ioeventfd
{
    public ulong datamatch;
    public ulong addr;
    public uint len;
    public int fd;
    public uint flags;
    public fixed byte pad[36];
}

[StructLayout(LayoutKind.Sequential)]
public unsafe struct kvm_msi
{
    public uint address_lo;
    public uint address_hi;
    public uint data;
    public uint flags;
    public uint devid;
    public fixed byte pad[12];
}

[StructLayout(LayoutKind.Sequential)]
public struct kvm_create_device
{
    public uint type;
    public uint fd;
    public uint flags;
}

/// <summary>KVM_SET/GET/HAS_DEVICE_ATTR; <c>addr</c> is a user pointer to the attribute's value.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct kvm_device_attr
{
    public uint flags;
    public uint group;
    public ulong attr;
    public ulong addr;
}
