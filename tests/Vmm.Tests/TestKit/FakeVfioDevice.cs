using System.Buffers.Binary;
using Vmm.Devices.Vfio;
using Vmm.Interop;

namespace Vmm.Tests.TestKit;

/// <summary>An in-memory VFIO device: a config region (bytes the test lays out), BAR regions backed by real
/// anonymous memory (MAP_NORESERVE, so a 128 GiB BAR costs only what is touched) that <see cref="MapRegion"/> hands
/// out, a ROM, and IRQ counts. Records everything the VMM asks of it in <see cref="Log"/>.</summary>
public sealed unsafe class FakeVfioDevice : IVfioDevice
{
    private const int ProtReadWrite = 1 | 2, MapPrivate = 0x02, MapAnonymous = 0x20, MapNoReserve = 0x4000;

    private readonly byte[] _config;
    private readonly Dictionary<int, (VfioRegionInfo Info, nint Backing)> _regions = [];
    private readonly Dictionary<VfioIrqIndex, uint> _irqs = [];
    private byte[] _rom = [];

    /// <summary>The checks of what vmm asks that failed. They also throw, but VfioPciFunction catches and logs a failed
    /// mapping (a real one fails with an errno), so a caller that must see them reads this list.</summary>
    public List<string> Violations { get; } = [];

    /// <summary>Records a failed check in <paramref name="violations"/>, then fails it as an xunit assertion.</summary>
    internal static void Check(List<string> violations, bool ok, string what)
    {
        if (ok)
            return;
        violations.Add(what);
        Assert.Fail(what);
    }

    public FakeVfioDevice(string name, byte[] config, bool canReset = true)
    {
        Name = name;
        _config = config;
        CanReset = canReset;
        _regions[VfioRegionIndex.Config] = (new VfioRegionInfo(VfioRegionIndex.Config,
            VfioRegionFlags.Read | VfioRegionFlags.Write, (ulong)config.Length, []), 0);
    }

    public string Name { get; }
    public bool IsPci => true;
    public bool CanReset { get; }
    public int RegionCount => 9;
    public int IrqCount => 5;

    /// <summary>What the VMM did, in order: "reset", "cfg w 0x04 0604", "irq Msix 0 fds=5,6", "disable Intx",
    /// "unmask-fd 9", "map 1 0x0+0x1000", "unmap 1 0x0+0x1000", "bar w 0 0x10 01000000".</summary>
    public List<string> Log { get; } = [];

    /// <summary>Every SET_IRQS with eventfds.</summary>
    public List<(VfioIrqIndex Index, int Start, int[] Fds)> IrqSets { get; } = [];

    public int? IntxUnmaskFd { get; private set; }
    public int Resets { get; private set; }
    public int LiveMappings { get; private set; }
    public bool Disposed { get; private set; }

    /// <summary>Regions whose reads and writes throw, as a device that went away does.</summary>
    public HashSet<int> FailingRegions { get; } = [];

    /// <summary>The device's side of its config region.</summary>
    public byte[] ConfigBytes => _config;

    public ushort DeviceCommand => BinaryPrimitives.ReadUInt16LittleEndian(_config.AsSpan(4));

    public FakeVfioDevice WithIrqs(uint intx, uint msi, uint msix)
    {
        _irqs[VfioIrqIndex.Intx] = intx;
        _irqs[VfioIrqIndex.Msi] = msi;
        _irqs[VfioIrqIndex.Msix] = msix;
        return this;
    }

    /// <summary>A BAR region of <paramref name="size"/> bytes; <paramref name="areas"/> are its mmappable parts.</summary>
    public FakeVfioDevice WithBar(int index, ulong size, params VfioMmapArea[] areas)
    {
        var flags = VfioRegionFlags.Read | VfioRegionFlags.Write | (areas.Length > 0 ? VfioRegionFlags.Mmap : 0);
        nint backing = (nint)Sys.Mmap((nuint)size, ProtReadWrite, MapPrivate | MapAnonymous | MapNoReserve, -1, 0, $"fake BAR{index}");
        _regions[index] = (new VfioRegionInfo(index, flags, size, areas), backing);
        return this;
    }

    public FakeVfioDevice WithRom(byte[] content)
    {
        _rom = content;
        _regions[VfioRegionIndex.Rom] = (new VfioRegionInfo(VfioRegionIndex.Rom, VfioRegionFlags.Read, (ulong)content.Length, []), 0);
        return this;
    }

    /// <summary>The host memory behind BAR <paramref name="index"/> (what the device's registers/VRAM hold).</summary>
    public Span<byte> BarMemory(int index, ulong offset, int length) => new((byte*)_regions[index].Backing + offset, length);

    public VfioRegionInfo GetRegionInfo(int index) =>
        _regions.TryGetValue(index, out var r) ? r.Info : new VfioRegionInfo(index, VfioRegionFlags.None, 0, []);

    public VfioIrqInfo GetIrqInfo(VfioIrqIndex index) =>
        new(index, VfioIrqFlags.EventFd, _irqs.GetValueOrDefault(index));

    private (VfioRegionInfo Info, nint Backing) Region(int index, ulong offset, int length, string op)
    {
        if (FailingRegions.Contains(index))
            throw new VfioException($"{Name}: {op} of region {index} at 0x{offset:x}: No such device (ENODEV)", 19);
        if (!_regions.TryGetValue(index, out var r) || offset + (ulong)length > r.Info.Size)
            throw new VfioException($"{Name}: {op} of region {index} at 0x{offset:x}+{length}: out of range (EINVAL)", 22);
        return r;
    }

    public void ReadRegion(int index, ulong offset, Span<byte> data)
    {
        var r = Region(index, offset, data.Length, "read");
        if (index == VfioRegionIndex.Config)
            _config.AsSpan((int)offset, data.Length).CopyTo(data);
        else if (index == VfioRegionIndex.Rom)
            _rom.AsSpan((int)offset, data.Length).CopyTo(data);
        else
            new Span<byte>((byte*)r.Backing + offset, data.Length).CopyTo(data);
    }

    public void WriteRegion(int index, ulong offset, ReadOnlySpan<byte> data)
    {
        var r = Region(index, offset, data.Length, "write");
        if (index == VfioRegionIndex.Config)
        {
            Log.Add($"cfg w 0x{offset:x2} {Convert.ToHexString(data)}");
            data.CopyTo(_config.AsSpan((int)offset));
        }
        else if (index == VfioRegionIndex.Rom)
            throw new VfioException($"{Name}: the ROM is read-only");
        else
        {
            Log.Add($"bar w {index} 0x{offset:x} {Convert.ToHexString(data)}");
            data.CopyTo(new Span<byte>((byte*)r.Backing + offset, data.Length));
        }
    }

    public IVfioMapping MapRegion(int index, ulong offset, ulong size)
    {
        var r = _regions[index];
        Check(Violations, offset % 4096 == 0 && size % 4096 == 0, $"MapRegion({index}, 0x{offset:x}, 0x{size:x}) not page aligned");
        Check(Violations, r.Info.MmapAreas.Any(a => offset >= a.Offset && offset + size <= a.End),
            $"MapRegion({index}, 0x{offset:x}, 0x{size:x}) is outside every mmap area");
        Log.Add($"map {index} 0x{offset:x}+0x{size:x}");
        LiveMappings++;
        return new Mapping(this, index, offset, size, r.Backing + (nint)offset);
    }

    private sealed class Mapping(FakeVfioDevice owner, int index, ulong offset, ulong size, nint host) : IVfioMapping
    {
        private bool _disposed;
        public nint HostAddress => host;
        public ulong Size => size;

        public void Dispose()
        {
            if (_disposed)
                return;
            _disposed = true;
            owner.LiveMappings--;
            owner.Log.Add($"unmap {index} 0x{offset:x}+0x{size:x}");
        }
    }

    public void SetIrqEventFds(VfioIrqIndex index, int start, ReadOnlySpan<int> eventFds)
    {
        IrqSets.Add((index, start, eventFds.ToArray()));
        Log.Add($"irq {index} {start} fds={string.Join(",", eventFds.ToArray())}");
    }

    public void DisableIrqs(VfioIrqIndex index) => Log.Add($"disable {index}");

    public void SetIntxUnmaskEventFd(int eventFd)
    {
        IntxUnmaskFd = eventFd;
        Log.Add($"unmask-fd {eventFd}");
    }

    public void Reset()
    {
        Resets++;
        Log.Add("reset");
    }

    public IVfioDmaSpace Dma { get; } = new NoDma();

    private sealed class NoDma : IVfioDmaSpace
    {
        public void Map(ulong iova, ulong size, nint hostAddress, int fd, long fdOffset, bool writable) { }
        public void Unmap(ulong iova, ulong size) { }
    }

    public void Dispose()
    {
        if (Disposed)
            return;
        Disposed = true;
        foreach (var (info, backing) in _regions.Values)
        {
            if (backing != 0)
                Sys.Munmap((void*)backing, (nuint)info.Size);
        }
    }
}

/// <summary>Records guest memory slots: "+0xGUEST/0xSIZE" and "-0xGUEST/0xSIZE"; <see cref="Live"/> holds the current ones.</summary>
public sealed class RecordingGuestMemoryMapper : IGuestMemoryMapper
{
    public List<string> Log { get; } = [];
    public List<(ulong Guest, ulong Size, nint Host, string Name)> Live { get; } = [];

    /// <summary>Failed checks (see <see cref="FakeVfioDevice.Violations"/>). An overlap with a live slot is not one: a
    /// guest can move one BAR onto another, and KVM refuses the second slot (EEXIST), which vmm logs.</summary>
    public List<string> Violations { get; } = [];

    public IDisposable Map(ulong guestAddress, ulong size, nint hostAddress, string name, int fd = -1, long fileOffset = 0)
    {
        FakeVfioDevice.Check(Violations, guestAddress % 4096 == 0 && size % 4096 == 0 && hostAddress % 4096 == 0,
            $"slot 0x{guestAddress:x}/0x{size:x} at host 0x{hostAddress:x} is not page aligned");
        Assert.DoesNotContain(Live, s => guestAddress < s.Guest + s.Size && s.Guest < guestAddress + size);
        var slot = (guestAddress, size, hostAddress, name);
        Live.Add(slot);
        Log.Add($"+0x{guestAddress:x}/0x{size:x}");
        return new Slot(this, slot);
    }

    private sealed class Slot(RecordingGuestMemoryMapper owner, (ulong Guest, ulong Size, nint Host, string Name) slot) : IDisposable
    {
        private bool _disposed;

        public void Dispose()
        {
            Assert.False(_disposed, $"slot 0x{slot.Guest:x} removed twice");
            _disposed = true;
            owner.Live.Remove(slot);
            owner.Log.Add($"-0x{slot.Guest:x}/0x{slot.Size:x}");
        }
    }
}

/// <summary>Records INTx irqfd attachments: "attach T R" (eventfd numbers) and "detach".</summary>
public sealed class RecordingIntxLine : IIntxIrqfdLine
{
    public List<string> Log { get; } = [];
    public (EventFd Trigger, EventFd Resample)? Attached { get; private set; }

    public IDisposable Attach(EventFd trigger, EventFd resample)
    {
        Assert.Null(Attached);
        Attached = (trigger, resample);
        Log.Add($"attach {trigger.Fd} {resample.Fd}");
        return new Handle(this);
    }

    private sealed class Handle(RecordingIntxLine owner) : IDisposable
    {
        public void Dispose()
        {
            owner.Attached = null;
            owner.Log.Add("detach");
        }
    }
}
