using Vmm.Interop;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Kvm;

/// <summary>A KVM virtual machine (the fd KVM_CREATE_VM returned): memory slots, interrupt controllers, vCPUs.</summary>
public sealed unsafe class VmFd : IDisposable
{
    private int _fd;
    private readonly int _vcpuMmapSize;

    internal VmFd(int fd, int vcpuMmapSize)
    {
        _fd = fd;
        _vcpuMmapSize = vcpuMmapSize;
    }

    public int Fd => _fd;

    /// <summary>KVM_CHECK_EXTENSION on the VM (some answers are per VM).</summary>
    public int CheckExtension(int capability)
    {
        int r = Sys.Ioctl(_fd, KVM_CHECK_EXTENSION, capability);
        return r < 0 ? 0 : r;
    }

    /// <summary>KVM_SET_USER_MEMORY_REGION: maps <paramref name="size"/> bytes at host address
    /// <paramref name="hostAddress"/> to guest physical <paramref name="guestPhysicalAddress"/>. A size of 0 deletes the slot.</summary>
    public void SetUserMemoryRegion(uint slot, ulong guestPhysicalAddress, ulong size, nint hostAddress, uint flags = 0)
    {
        var region = new kvm_userspace_memory_region
        {
            slot = slot,
            flags = flags,
            guest_phys_addr = guestPhysicalAddress,
            memory_size = size,
            userspace_addr = (ulong)hostAddress,
        };
        if (Sys.Ioctl(_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
            throw new KvmException("KVM_SET_USER_MEMORY_REGION", Errno.Last,
                $"slot {slot}: guest 0x{guestPhysicalAddress:x}+0x{size:x}");
    }

    /// <summary>KVM_SET_TSS_ADDR: three pages of guest-physical space KVM needs for real-mode emulation on Intel.</summary>
    public void SetTssAddress(ulong address) =>
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_SET_TSS_ADDR, (nint)address), "KVM_SET_TSS_ADDR");

    /// <summary>KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map used in real mode on Intel.</summary>
    public void SetIdentityMapAddress(ulong address)
    {
        ulong a = address;
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_SET_IDENTITY_MAP_ADDR, &a), "KVM_SET_IDENTITY_MAP_ADDR");
    }

    /// <summary>KVM_CREATE_IRQCHIP: the in-kernel PIC pair, IOAPIC and a local APIC per vCPU.</summary>
    public void CreateIrqChip() => KvmSystem.Check(Sys.Ioctl(_fd, KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");

    /// <summary>KVM_CREATE_PIT2: the in-kernel i8254 timer (ports 0x40-0x43, IRQ 0).</summary>
    public void CreatePit2()
    {
        // KVM_PIT_SPEAKER_DUMMY: port 0x61 is answered in the kernel too, as firmware-free guests expect.
        var config = new kvm_pit_config { flags = KVM_PIT_SPEAKER_DUMMY };
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_CREATE_PIT2, &config), "KVM_CREATE_PIT2");
    }

    /// <summary>KVM_IRQ_LINE: sets the level of an input pin of the in-kernel PIC/IOAPIC. Called from device
    /// threads; allocates nothing and never throws (a failed interrupt must not kill a device thread).</summary>
    public bool SetIrqLine(uint irq, bool level)
    {
        var l = new kvm_irq_level { irq = irq, level = level ? 1u : 0u };
        return Sys.Ioctl(_fd, KVM_IRQ_LINE, &l) >= 0;
    }

    /// <summary>KVM_SET_GSI_ROUTING: replaces the whole GSI routing table (irqchip pins and MSI routes).</summary>
    public void SetGsiRouting(ReadOnlySpan<kvm_irq_routing_entry> entries)
    {
        int size = sizeof(kvm_irq_routing) + entries.Length * sizeof(kvm_irq_routing_entry);
        byte[] buffer = new byte[size];
        fixed (byte* p = buffer)
        {
            ((kvm_irq_routing*)p)->nr = (uint)entries.Length;
            entries.CopyTo(new Span<kvm_irq_routing_entry>(p + sizeof(kvm_irq_routing), entries.Length));
            KvmSystem.Check(Sys.Ioctl(_fd, KVM_SET_GSI_ROUTING, p), "KVM_SET_GSI_ROUTING", $"{entries.Length} routes");
        }
    }

    /// <summary>KVM_IRQFD: a signal on <paramref name="eventFd"/> injects <paramref name="gsi"/> in the kernel. With
    /// <paramref name="resampleFd"/> the GSI is level-triggered: KVM deasserts it at EOI and signals the resample fd.</summary>
    public void AssignIrqfd(int eventFd, uint gsi, int resampleFd = -1)
    {
        var a = new kvm_irqfd { fd = (uint)eventFd, gsi = gsi };
        if (resampleFd >= 0)
        {
            a.flags = KVM_IRQFD_FLAG_RESAMPLE;
            a.resamplefd = (uint)resampleFd;
        }
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_IRQFD, &a), "KVM_IRQFD", $"eventfd {eventFd} → GSI {gsi}");
    }

    public void DeassignIrqfd(int eventFd, uint gsi)
    {
        var a = new kvm_irqfd { fd = (uint)eventFd, gsi = gsi, flags = KVM_IRQFD_FLAG_DEASSIGN };
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_IRQFD, &a), "KVM_IRQFD (deassign)", $"eventfd {eventFd} GSI {gsi}");
    }

    /// <summary>KVM_IOEVENTFD: a guest write of <paramref name="length"/> bytes to <paramref name="address"/> (MMIO, or
    /// an I/O port with <paramref name="pio"/>) signals <paramref name="eventFd"/> in the kernel instead of exiting to
    /// userspace. With <paramref name="dataMatch"/> only writes of that value do.</summary>
    public void AssignIoeventfd(int eventFd, ulong address, uint length, bool pio = false, ulong? dataMatch = null, bool deassign = false)
    {
        var a = new kvm_ioeventfd { addr = address, len = length, fd = eventFd };
        if (pio)
            a.flags |= KVM_IOEVENTFD_FLAG_PIO;
        if (dataMatch is ulong match)
        {
            a.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
            a.datamatch = match;
        }
        if (deassign)
            a.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
        // The message is built only on failure: BAR moves re-register these from a vCPU thread.
        if (Sys.Ioctl(_fd, KVM_IOEVENTFD, &a) < 0)
            throw new KvmException(deassign ? "KVM_IOEVENTFD (deassign)" : "KVM_IOEVENTFD", Errno.Last,
                $"{(pio ? "port" : "MMIO")} 0x{address:x} len {length}");
    }

    /// <summary>KVM_SIGNAL_MSI: injects one MSI directly (no route needed).</summary>
    public bool SignalMsi(ulong address, uint data)
    {
        var m = new kvm_msi { address_lo = (uint)address, address_hi = (uint)(address >> 32), data = data };
        return Sys.Ioctl(_fd, KVM_SIGNAL_MSI, &m) >= 0;
    }

    /// <summary>KVM_CREATE_DEVICE: an in-kernel device of type <paramref name="type"/> (KVM_DEV_TYPE_*).</summary>
    public KvmDeviceFd CreateDevice(uint type)
    {
        var d = new kvm_create_device { type = type };
        KvmSystem.Check(Sys.Ioctl(_fd, KVM_CREATE_DEVICE, &d), "KVM_CREATE_DEVICE", $"type {type}");
        return new KvmDeviceFd((int)d.fd, type);
    }

    /// <summary>KVM_CREATE_VCPU with the given APIC id, and the mmapped <c>kvm_run</c> page of it.</summary>
    public VcpuFd CreateVcpu(int id)
    {
        int fd = KvmSystem.Check(Sys.Ioctl(_fd, KVM_CREATE_VCPU, id), "KVM_CREATE_VCPU");
        try
        {
            void* run = Sys.Mmap((nuint)_vcpuMmapSize, Sys.PROT_READ | Sys.PROT_WRITE, Sys.MAP_SHARED, fd, 0, $"kvm_run of vCPU {id}");
            return new VcpuFd(fd, id, (byte*)run, _vcpuMmapSize);
        }
        catch
        {
            Sys.Close(fd);
            throw;
        }
    }

    public void Dispose()
    {
        Sys.Close(_fd);
        _fd = -1;
    }
}
