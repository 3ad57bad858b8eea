using System.Buffers.Binary;
using Vmm.Devices;
using Vmm.Devices.Pci;
using Vmm.Devices.Vfio;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Fuzz;

/// <summary>Guest accesses to one PCI function on a real <see cref="PciRootBus"/>, which places its BARs as at boot; the
/// guest then turns on memory decode and bus mastering. Config accesses go through the 0xCF8/0xCFC ports (1, 2 or 4
/// bytes at any byte of the data port; the bus refuses one that straddles the dword) or the ECAM window (1-8 bytes at
/// any offset; the bus refuses an unaligned one); BAR accesses of 1-8 bytes at any offset inside a BAR go through the
/// window the BAR's address is in (they may run past its end, as an MMIO exit may); the bus decodes them, so a BAR the
/// guest moved out of the windows or turned off is not reached. Each op is 8 bytes: [op: bits 0-1 config write /
/// config read / BAR write / BAR read, bit 2 port-style config access, bit 3 BAR offset from the end, bits 4-7 which
/// BAR] [width: 1 2 4 8 by bits 0-1] [offset u16] [value u32].</summary>
public static class PciOps
{
    private static readonly int[] s_widths = [1, 2, 4, 8];

    /// <summary>The 64-bit window of a small guest: from 4 GiB, 64 GiB.</summary>
    private const ulong Window64Start = 1UL << 32, Window64Size = 64UL << 30;

    /// <summary>Puts <paramref name="f"/> on a root bus as vmm does at boot, applies the input's accesses, takes it off
    /// the bus (as an eject does: its BARs decode nowhere) and disposes the function and its MSI routes whatever
    /// happened. A function whose BARs do not fit the windows is vmm's documented refusal.</summary>
    public static void EnumerateApplyDispose<T>(T f, ref FuzzReader r, NullMsiController msi) where T : PciFunction, IDisposable
    {
        var bus = new PciRootBus(Window64Start, Window64Size);
        int slot = -1;
        try
        {
            try
            {
                slot = bus.Add(f);
            }
            catch (PciConfigException e)
            {
                FuzzTargets.Explain(e.Message);
                return;
            }
            Span<byte> command = stackalloc byte[2];
            BinaryPrimitives.WriteUInt16LittleEndian(command, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster);
            bus.ConfigWrite(0, slot, 0, PciConfigSpace.Command, command);
            Apply(bus, slot, f, ref r);
        }
        finally
        {
            if (slot > 0)
                bus.Remove(slot);
            f.Dispose();
            msi.DisposeAll();
        }
    }

    private static void Apply(PciRootBus bus, int slot, PciFunction f, ref FuzzReader r, int maxOps = 256)
    {
        Span<byte> data = stackalloc byte[8];
        Span<byte> address = stackalloc byte[4];
        for (int i = 0; i < maxOps && !r.AtEnd; i++)
        {
            byte op = r.U8();
            int width = s_widths[r.U8() & 3];
            ushort offset = r.U16();
            uint value = r.U32();
            BinaryPrimitives.WriteUInt32LittleEndian(data, value);
            BinaryPrimitives.WriteUInt32LittleEndian(data[4..], ~value);
            var bytes = data[..width];
            bool write = (op & 1) == 0;
            if ((op & 3) <= 1)
            {
                IBusDevice port;
                ulong at;
                if ((op & 4) != 0)
                {
                    // CONFIG_ADDRESS (enable bit, this slot, the dword), then a CONFIG_DATA byte: 0xCFC-0xCFF.
                    BinaryPrimitives.WriteUInt32LittleEndian(address, 0x8000_0000u | ((uint)slot << 11) | (offset & 0xFCu));
                    bus.ConfigIo.Write(0, address);
                    (port, at) = (bus.ConfigIo, 4 + (ulong)((offset >> 12) & 3));
                    bytes = data[..Math.Min(width, 4)];
                }
                else
                    (port, at) = (bus.Ecam, (ulong)(((uint)slot << 15) | (offset & 0xFFFu)));
                if (write)
                    port.Write(at, bytes);
                else
                    port.Read(at, bytes);
                continue;
            }
            var bars = f.Config.Bars;
            if (bars.Count == 0)
                continue;
            var bar = bars[(op >> 4) % bars.Count];
            ulong within = offset % bar.Size;
            if ((op & 8) != 0)
                within = bar.Size - 1 - within;
            ulong guest = f.Config.BarAddress(bar.Index) + within;
            var (window, start) = guest >= Window64Start ? (bus.Mmio64Window, Window64Start) : (bus.Mmio32Window, MemoryLayout.PciMmio32Start);
            if (guest < start)
                continue;
            if (write)
                window.Write(guest - start, bytes);
            else
                window.Read(guest - start, bytes);
        }
    }
}

/// <summary>MSI vectors that only count: the PCI targets need no interrupt to go anywhere.</summary>
public sealed class NullMsiController : IMsiController
{
    public List<Vector> Vectors { get; } = [];

    public IMsiVector CreateVector(string owner, int index)
    {
        var v = new Vector();
        Vectors.Add(v);
        return v;
    }

    public void DisposeAll()
    {
        foreach (var v in Vectors)
            v.EventFd.Dispose();
        Vectors.Clear();
    }

    public sealed class Vector : IMsiVector
    {
        public EventFd EventFd { get; } = new();
        public void Configure(ulong address, uint data) { }
        public void Trigger() { }
        public void SetMasked(bool masked) { }
        public bool IsPending => false;
    }
}

/// <summary>A virtio-pci function (virtio-rng behind it) as a guest driver meets it: config space, the capability
/// list, and BAR0's common configuration (feature negotiation, queue setup, status up to DRIVER_OK, which activates
/// the device), ISR, device configuration, notification and MSI-X table. Input: ops for <see cref="PciOps"/>.
/// Invariant: no access throws.</summary>
public sealed class PciVirtioTarget : IFuzzTarget
{
    private readonly GuestMemory _memory = GuestMemory.Create(1 << 20);

    public void Run(ReadOnlySpan<byte> input)
    {
        var r = new FuzzReader(input);
        var msi = new NullMsiController();
        using var device = new VirtioRng();
        var f = new VirtioPciFunction(device, _memory, msi, null);
        PciOps.EnumerateApplyDispose(f, ref r, msi);
    }

    public void Dispose() => _memory.Dispose();
}

/// <summary>A passed-through device (the test kit's FakeVfioDevice) whose config space is the input's first part —
/// a device's own capability lists are not to be trusted either — then guest accesses to its VfioPciFunction.
/// Input: [config length u16, at most 4096] [that many config bytes] [ops for <see cref="PciOps"/>]. Regions:
/// BAR0 16 MiB, BAR1 256 MiB and BAR3 32 MiB mmappable, BAR5 128 bytes of I/O, a 4 KiB ROM; INTx, 16 MSI, 6 MSI-X.
/// Invariants: a config space vmm cannot present is refused with <see cref="VfioException"/> at creation, nothing
/// else throws; every BAR mmap and guest memory slot vmm asks for is page aligned and inside the region's mmap areas
/// (the fakes record a violation: the function catches a failed mapping, as it must for a real errno); no slot is
/// left once the function is off the bus and disposed. Overlapping slots are not a violation: the guest can move one
/// BAR onto another, and KVM refuses the second slot, which vmm logs.</summary>
public sealed class PciVfioTarget : IFuzzTarget
{
    private const ulong MiB = 1 << 20;

    public void Run(ReadOnlySpan<byte> input)
    {
        var r = new FuzzReader(input);
        int length = Math.Min((int)r.U16(), 4096);
        var config = new byte[length < 64 ? 256 : length];
        r.Bytes(length).CopyTo(config);
        using var device = new FakeVfioDevice("fuzz", config)
            .WithBar(0, 16 * MiB, new VfioMmapArea(0, 16 * MiB))
            .WithBar(1, 256 * MiB, new VfioMmapArea(0, 256 * MiB))
            .WithBar(3, 32 * MiB, new VfioMmapArea(0, 32 * MiB))
            .WithBar(5, 128)
            .WithRom(new byte[4096])
            .WithIrqs(intx: 1, msi: 16, msix: 6);
        var msi = new NullMsiController();
        var mapper = new RecordingGuestMemoryMapper();
        VfioPciFunction f;
        try
        {
            f = new VfioPciFunction(device, msi, mapper, new RecordingIntxLine(), null);
        }
        catch (VfioException e)
        {
            FuzzTargets.Explain(e.Message);
            msi.DisposeAll();
            return; // the documented refusal of a device vmm cannot pass through
        }
        PciOps.EnumerateApplyDispose(f, ref r, msi);
        if (device.Violations.Concat(mapper.Violations).FirstOrDefault() is string violation)
            throw new FuzzInvariantException(violation);
        if (mapper.Live.Count != 0)
            throw new FuzzInvariantException($"{mapper.Live.Count} guest memory slots left after the function was disposed");
    }

    public void Dispose() { }
}
