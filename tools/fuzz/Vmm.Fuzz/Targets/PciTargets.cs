using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Devices.Vfio;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Fuzz;

/// <summary>Guest accesses to one PCI function, delivered as <see cref="PciRootBus"/> delivers them: config accesses
/// of 1, 2 or 4 bytes inside one dword (the 0xCF8/0xCFC ports) or naturally aligned 1-8 bytes (ECAM), never past
/// 4 KiB; a config write touching a BAR or the command register re-decodes the BARs and tells the function
/// (<see cref="PciFunction.BarMapped"/>); BAR accesses of 1-8 bytes at any offset inside a decoded BAR (they may
/// run past its end, as an MMIO exit may). Each op is 8 bytes: [op: bits 0-1 config write / config read / BAR
/// write / BAR read, bit 2 port-style config access, bit 3 BAR offset from the end, bits 4-7 which BAR]
/// [width: 1 2 4 8 by bits 0-1] [offset u16] [value u32].</summary>
public static class PciOps
{
    private static readonly int[] s_widths = [1, 2, 4, 8];

    /// <summary>Enumerates <paramref name="f"/> as a guest would, applies the input's accesses, then disposes the function
    /// and its MSI routes whatever happened.</summary>
    public static void EnumerateApplyDispose<T>(T f, ref FuzzReader r, NullMsiController msi) where T : PciFunction, IDisposable
    {
        try
        {
            var mapped = Enumerate(f);
            Apply(f, ref r, mapped);
        }
        finally
        {
            f.Dispose();
            msi.DisposeAll();
        }
    }

    public static void Apply(PciFunction f, ref FuzzReader r, Dictionary<int, ulong?> mapped, int maxOps = 256)
    {
        Span<byte> data = stackalloc byte[8];
        for (int i = 0; i < maxOps && !r.AtEnd; i++)
        {
            byte op = r.U8();
            int width = s_widths[r.U8() & 3];
            ushort offset = r.U16();
            uint value = r.U32();
            BinaryPrimitives.WriteUInt32LittleEndian(data, value);
            BinaryPrimitives.WriteUInt32LittleEndian(data[4..], ~value);
            var bytes = data[..width];
            switch (op & 3)
            {
                case 0 or 1:
                {
                    int reg;
                    if ((op & 4) != 0)
                    {
                        if (width == 8)
                            width = 4;
                        bytes = data[..width];
                        reg = (offset & 0xFFC) + ((offset >> 12) & 3) % (5 - width);
                    }
                    else
                        reg = offset & 0xFFF & ~(width - 1);
                    if ((op & 3) == 1)
                        f.ConfigRead(reg, bytes);
                    else
                        ConfigWrite(f, reg, bytes, mapped);
                    break;
                }
                default:
                {
                    var live = mapped.Where(m => m.Value is not null).Select(m => m.Key).ToArray();
                    if (live.Length == 0)
                        break;
                    int bar = live[(op >> 4) % live.Length];
                    ulong size = f.Config.Bars.First(b => b.Index == bar).Size;
                    ulong at = offset % size;
                    if ((op & 8) != 0)
                        at = size - 1 - at;
                    if ((op & 3) == 2)
                        f.BarWrite(bar, at, bytes);
                    else
                        f.BarRead(bar, at, bytes);
                    break;
                }
            }
        }
    }

    /// <summary>A config write and what the root bus does after it (PciRootBus.RebuildDecodeLocked, one function).</summary>
    public static void ConfigWrite(PciFunction f, int reg, ReadOnlySpan<byte> bytes, Dictionary<int, ulong?> mapped)
    {
        bool bars = PciConfigSpace.TouchesBars(reg, bytes.Length) || PciConfigSpace.TouchesCommand(reg, bytes.Length);
        f.ConfigWrite(reg, bytes);
        if (!bars)
            return;
        foreach (var bar in f.Config.Bars)
        {
            ulong? now = null;
            ulong start = f.Config.BarAddress(bar.Index);
            if (f.Config.MemoryDecodeEnabled && f.Config.BarEnabled(bar.Index) && start != 0 && start + bar.Size > start)
                now = start;
            mapped.TryGetValue(bar.Index, out var before);
            if (before != now)
            {
                mapped[bar.Index] = now;
                f.BarMapped(bar.Index, now);
            }
        }
    }

    /// <summary>What firmware does before the guest runs: every BAR at a distinct aligned address, memory decode on.</summary>
    public static Dictionary<int, ulong?> Enumerate(PciFunction f)
    {
        var mapped = new Dictionary<int, ulong?>();
        Span<byte> b = stackalloc byte[4];
        ulong next32 = MemoryLayout.PciMmio32Start, next64 = 0x1_0000_0000;
        foreach (var bar in f.Config.Bars.OrderByDescending(b => b.Size))
        {
            ref ulong next = ref bar.Kind == PciBarKind.Memory64 ? ref next64 : ref next32;
            ulong address = (next + bar.Size - 1) & ~(bar.Size - 1);
            next = address + bar.Size;
            int reg = bar.Index == PciConfigSpace.RomBarIndex ? PciConfigSpace.ExpansionRom : PciConfigSpace.Bar0 + 4 * bar.Index;
            BinaryPrimitives.WriteUInt32LittleEndian(b, (uint)address | (bar.Index == PciConfigSpace.RomBarIndex ? 1u : 0));
            ConfigWrite(f, reg, b, mapped);
            if (bar.Kind == PciBarKind.Memory64)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(b, (uint)(address >> 32));
                ConfigWrite(f, reg + 4, b, mapped);
            }
        }
        BinaryPrimitives.WriteUInt16LittleEndian(b, PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster);
        ConfigWrite(f, PciConfigSpace.Command, b[..2], mapped);
        return mapped;
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
/// Invariants: no access throws; the function is always disposable.</summary>
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
/// else throws; guest memory slots never overlap and are page aligned (the fake mapper checks).</summary>
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
        if (mapper.Live.Count != 0)
            throw new FuzzInvariantException($"{mapper.Live.Count} guest memory slots left after the function was disposed");
    }

    public void Dispose() { }
}
