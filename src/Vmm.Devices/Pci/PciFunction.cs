namespace Vmm.Devices.Pci;

/// <summary>One PCI function: its configuration space and the registers behind its BARs. Config accesses are
/// serialized by <see cref="PciRootBus"/>; BAR accesses come from vCPU threads and must not block for long.</summary>
public abstract class PciFunction(PciConfigSpace config)
{
    public PciConfigSpace Config { get; } = config;

    /// <summary>A short name for logs and errors ("virtio-blk", "host bridge").</summary>
    public abstract string Name { get; }

    /// <summary>Where the function sits on the root bus (set when it is added).</summary>
    public int Slot { get; internal set; } = -1;

    /// <summary>Guest read of configuration space.</summary>
    public virtual void ConfigRead(int offset, Span<byte> data) => Config.Read(offset, data);

    /// <summary>Guest write of configuration space. Overrides call the base and then react (MSI-X enable, ...).</summary>
    public virtual void ConfigWrite(int offset, ReadOnlySpan<byte> data) => Config.Write(offset, data);

    /// <summary>A read of BAR <paramref name="bar"/> at <paramref name="offset"/> (only while memory decode is on).</summary>
    public virtual void BarRead(int bar, ulong offset, Span<byte> data) => data.Fill(0xFF);

    /// <summary>A write to BAR <paramref name="bar"/> at <paramref name="offset"/>.</summary>
    public virtual void BarWrite(int bar, ulong offset, ReadOnlySpan<byte> data) { }

    /// <summary>The guest moved a BAR or switched memory decode: <paramref name="address"/> is where BAR
    /// <paramref name="bar"/> now decodes, or null when it decodes nowhere. (ioeventfds follow the BAR.)</summary>
    public virtual void BarMapped(int bar, ulong? address) { }
}

/// <summary>The root complex itself at 00:00.0: a PCIe host bridge with no BARs.</summary>
public sealed class PciHostBridge() : PciFunction(new PciConfigSpace(
    vendorId: 0x1B36, deviceId: 0x0008, classCode: 0x06, subClass: 0x00)) // Red Hat "PCIe host bridge"
{
    public override string Name => "host bridge";
}
