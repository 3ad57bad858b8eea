using System.Buffers.Binary;
using Vmm.Memory;

namespace Vmm.Devices.Pci;

/// <summary>PCI segment 0, bus 0: up to 32 single-function devices behind the host bridge at 00:00.0. Serves
/// configuration space through the 0xCF8/0xCFC mechanism (<see cref="ConfigIo"/>) and ECAM
/// (<see cref="Ecam"/>), places BARs in the 32-bit and 64-bit windows, and decodes BAR accesses in those
/// windows (<see cref="Mmio32Window"/> and <see cref="Mmio64Window"/> go on the MMIO bus). A BAR decodes only
/// while its function's memory-space bit is set, wherever the guest moved it inside the windows.</summary>
public sealed class PciRootBus
{
    public const int SlotCount = 32;

    private readonly PciFunction?[] _slots = new PciFunction?[SlotCount];
    private readonly Lock _configLock = new();
    private readonly ulong _window64Start, _window64Size;
    // The decoded BARs, rebuilt (copy on write) when a BAR or a command register changes; read without a lock.
    private DecodedBar[] _decoded = [];

    private readonly record struct DecodedBar(ulong Start, ulong End, PciFunction Function, int Bar);

    public PciRootBus(ulong window64Start, ulong window64Size)
    {
        _window64Start = window64Start;
        _window64Size = window64Size;
        Add(new PciHostBridge(), 0);
        ConfigIo = new ConfigIoPorts(this);
        Ecam = new EcamWindow(this);
        Mmio32Window = new BarWindow(this, MemoryLayout.PciMmio32Start);
        Mmio64Window = new BarWindow(this, window64Start);
    }

    /// <summary>Ports 0xCF8-0xCFF: CONFIG_ADDRESS and CONFIG_DATA.</summary>
    public IBusDevice ConfigIo { get; }
    public const ushort ConfigIoPort = 0xCF8, ConfigIoLength = 8;

    /// <summary>The ECAM window, at <see cref="MemoryLayout.PciEcamBase"/> for <see cref="MemoryLayout.PciEcamSize"/> bytes.</summary>
    public IBusDevice Ecam { get; }

    /// <summary>BAR decoding in the 32-bit window (on the MMIO bus at PciMmio32Start, PciMmio32Size bytes).</summary>
    public IBusDevice Mmio32Window { get; }

    /// <summary>BAR decoding in the 64-bit window above RAM.</summary>
    public IBusDevice Mmio64Window { get; }

    public ulong Window64Start => _window64Start;
    public ulong Window64Size => _window64Size;

    public IEnumerable<PciFunction> Functions => _slots.OfType<PciFunction>();

    /// <summary>The lowest free slot above the host bridge's, or -1 when all are taken.</summary>
    public int FirstFreeSlot() => Array.FindIndex(_slots, 1, s => s is null);

    /// <summary>Adds <paramref name="function"/> in the first free slot (or <paramref name="slot"/>) and places its
    /// BARs (largest first, naturally aligned, each at the lowest address no other function's BAR holds, so space a
    /// removed device left is used again): 32-bit BARs and non-prefetchable 64-bit BARs in the 32-bit window,
    /// prefetchable 64-bit BARs above RAM; an expansion ROM (index 6) in the 32-bit window, decoding only while its
    /// enable bit is set.</summary>
    public int Add(PciFunction function, int slot = -1)
    {
        lock (_configLock)
        {
            if (slot < 0)
                slot = FirstFreeSlot();
            if (slot < 0)
                throw new PciConfigException($"no free PCI slot for {function.Name}: all {SlotCount} are taken");
            if (_slots[slot] is not null)
                throw new PciConfigException($"PCI slot {slot} is taken by {_slots[slot]!.Name}");
            var taken = TakenRangesLocked();
            ulong end32 = MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size, end64 = _window64Start + _window64Size;
            var placed = new List<(int Index, ulong Address)>();
            foreach (var bar in function.Config.Bars.OrderByDescending(b => b.Size))
            {
                // Prefetchable 64-bit BARs go above RAM. A non-prefetchable 64-bit BAR stays below 4 GiB (guests with
                // 32-bit drivers expect that) unless the 32-bit window lacks room: on the root bus, with no bridge
                // in between, it may decode anywhere.
                ulong? low = FirstFit(taken, MemoryLayout.PciMmio32Start, end32, bar.Size);
                bool high = bar.Kind == PciBarKind.Memory64 && (bar.Prefetchable || low is null);
                ulong? address = high ? FirstFit(taken, _window64Start, end64, bar.Size) : low;
                if (address is not ulong at)
                {
                    ulong first = high ? _window64Start : MemoryLayout.PciMmio32Start, last = (high ? end64 : end32) - 1;
                    ulong free = FreeBytes(taken, first, last + 1);
                    throw new PciConfigException($"{function.Name}: {bar} does not fit in the {(high ? "64-bit" : "32-bit")} PCI window " +
                        $"0x{first:x}-0x{last:x} " + (free == 0 ? "(it is full)" : $"(0x{free:x} bytes free, but no naturally aligned range of that size)"));
                }
                placed.Add((bar.Index, at));
                taken.Add((at, at + bar.Size));
                taken.Sort((a, b) => a.Start.CompareTo(b.Start));
            }
            foreach (var (index, at) in placed)
                function.Config.SetBarAddress(index, at);
            byte pin = function.Config.Get8(PciConfigSpace.InterruptPin);
            if (pin != 0)
                function.Config.SetInterruptLine((byte)MemoryLayout.PciIntxGsi(slot, pin - 1));
            function.Slot = slot;
            _slots[slot] = function;
            return slot;
        }
    }

    /// <summary>Takes the function in <paramref name="slot"/> off the bus (hot unplug): its configuration space reads
    /// all-ones from now on and its BARs decode nowhere (the function is told, so ioeventfds and BAR mappings go).
    /// Returns the function, or null when the slot was empty.</summary>
    public PciFunction? Remove(int slot)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(slot, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(slot, SlotCount);
        lock (_configLock)
        {
            var function = _slots[slot];
            if (function is null)
                return null;
            _slots[slot] = null;
            RebuildDecodeLocked(function);
            function.Slot = -1;
            return function;
        }
    }

    /// <summary>Where the functions' BARs are now (where the guest moved them or where they were placed), sorted.</summary>
    private List<(ulong Start, ulong End)> TakenRangesLocked()
    {
        var taken = new List<(ulong Start, ulong End)>();
        foreach (var f in Functions)
        {
            foreach (var bar in f.Config.Bars)
            {
                ulong start = f.Config.BarAddress(bar.Index);
                if (start != 0 && start + bar.Size > start)
                    taken.Add((start, start + bar.Size));
            }
        }
        taken.Sort((a, b) => a.Start.CompareTo(b.Start));
        return taken;
    }

    /// <summary>The lowest address in [<paramref name="start"/>, <paramref name="end"/>) aligned to
    /// <paramref name="size"/> (a power of two) whose range overlaps nothing in <paramref name="taken"/>.</summary>
    private static ulong? FirstFit(List<(ulong Start, ulong End)> taken, ulong start, ulong end, ulong size)
    {
        ulong at = Align(start, size);
        while (at >= start && at + size > at && at + size <= end)
        {
            var hit = taken.FindIndex(t => t.Start < at + size && at < t.End);
            if (hit < 0)
                return at;
            ulong next = Align(taken[hit].End, size);
            if (next <= at)
                return null;
            at = next;
        }
        return null;
    }

    private static ulong Align(ulong value, ulong size) => (value + size - 1) & ~(size - 1);

    private static ulong FreeBytes(List<(ulong Start, ulong End)> taken, ulong start, ulong end)
    {
        ulong used = 0;
        foreach (var (s, e) in taken)
        {
            ulong a = Math.Max(s, start), b = Math.Min(e, end);
            if (b > a)
                used += b - a;
        }
        return end - start - Math.Min(used, end - start);
    }

    public PciFunction? this[int slot] => _slots[slot];

    /// <summary>A configuration read of bus 0; absent functions and other buses read all-ones.</summary>
    public void ConfigRead(int bus, int device, int function, int offset, Span<byte> data)
    {
        var f = Lookup(bus, device, function);
        if (f is null || offset < 0 || offset + data.Length > PciConfigSpace.Size)
        {
            data.Fill(0xFF);
            return;
        }
        lock (_configLock)
            f.ConfigRead(offset, data);
    }

    public void ConfigWrite(int bus, int device, int function, int offset, ReadOnlySpan<byte> data)
    {
        var f = Lookup(bus, device, function);
        if (f is null || offset < 0 || offset + data.Length > PciConfigSpace.Size)
            return;
        lock (_configLock)
        {
            bool barsBefore = PciConfigSpace.TouchesBars(offset, data.Length) || PciConfigSpace.TouchesCommand(offset, data.Length);
            f.ConfigWrite(offset, data);
            if (barsBefore)
                RebuildDecodeLocked(f);
        }
    }

    private PciFunction? Lookup(int bus, int device, int function) =>
        bus == 0 && function == 0 && (uint)device < SlotCount ? _slots[device] : null;

    private void RebuildDecodeLocked(PciFunction changed)
    {
        var list = new List<DecodedBar>();
        foreach (var f in Functions)
        {
            if (!f.Config.MemoryDecodeEnabled)
                continue;
            foreach (var bar in f.Config.Bars)
            {
                if (!f.Config.BarEnabled(bar.Index))
                    continue;
                ulong start = f.Config.BarAddress(bar.Index);
                // A BAR being sized holds all-ones; it decodes nowhere until it gets an address again.
                if (start == 0 || start + bar.Size < start || !InWindows(start, bar.Size))
                    continue;
                list.Add(new DecodedBar(start, start + bar.Size, f, bar.Index));
            }
        }
        list.Sort((a, b) => a.Start.CompareTo(b.Start));
        var previous = _decoded;
        Volatile.Write(ref _decoded, [.. list]);
        // Tell the function what changed for its own BARs (ioeventfds follow their notify BAR).
        foreach (var bar in changed.Config.Bars)
        {
            ulong? before = Find(previous, changed, bar.Index);
            ulong? after = Find(_decoded, changed, bar.Index);
            if (before != after)
                changed.BarMapped(bar.Index, after);
        }
    }

    private static ulong? Find(DecodedBar[] decoded, PciFunction f, int bar)
    {
        foreach (var d in decoded)
        {
            if (d.Function == f && d.Bar == bar)
                return d.Start;
        }
        return null;
    }

    private bool InWindows(ulong start, ulong size) =>
        (start >= MemoryLayout.PciMmio32Start && start + size <= MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size)
        || (start >= _window64Start && start + size <= _window64Start + _window64Size);

    private bool DecodeBar(ulong address, out PciFunction function, out int bar, out ulong offset)
    {
        var decoded = Volatile.Read(ref _decoded);
        foreach (ref readonly var d in decoded.AsSpan())
        {
            if (address >= d.Start && address < d.End)
            {
                function = d.Function;
                bar = d.Bar;
                offset = address - d.Start;
                return true;
            }
        }
        function = null!;
        bar = 0;
        offset = 0;
        return false;
    }

    private sealed class ConfigIoPorts(PciRootBus root) : IBusDevice
    {
        private uint _address;

        public void Read(ulong offset, Span<byte> data)
        {
            if (offset == 0 && data.Length == 4)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(data, Volatile.Read(ref _address));
                return;
            }
            if (offset >= 4 && Decode(offset, data.Length, out int dev, out int fn, out int reg, out int bus))
            {
                root.ConfigRead(bus, dev, fn, reg, data);
                return;
            }
            data.Fill(0xFF);
        }

        public void Write(ulong offset, ReadOnlySpan<byte> data)
        {
            if (offset == 0 && data.Length == 4)
            {
                // Bits 1:0 are reserved (read as 0); bits 30:24 too.
                Volatile.Write(ref _address, BinaryPrimitives.ReadUInt32LittleEndian(data) & 0x80FF_FFFC);
                return;
            }
            if (offset >= 4 && Decode(offset, data.Length, out int dev, out int fn, out int reg, out int bus))
                root.ConfigWrite(bus, dev, fn, reg, data);
        }

        private bool Decode(ulong offset, int length, out int device, out int function, out int register, out int bus)
        {
            uint a = Volatile.Read(ref _address);
            bus = (int)(a >> 16) & 0xFF;
            device = (int)(a >> 11) & 0x1F;
            function = (int)(a >> 8) & 7;
            register = (int)(a & 0xFC) + (int)(offset - 4);
            // Only with the enable bit, and never straddling the dword.
            return (a & 0x8000_0000) != 0 && (int)(offset - 4) + length <= 4;
        }
    }

    private sealed class EcamWindow(PciRootBus root) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data)
        {
            Decode(offset, out int bus, out int dev, out int fn, out int reg);
            if ((reg & (data.Length - 1)) != 0)
            {
                data.Fill(0xFF); // unaligned ECAM accesses are undefined; treat as unsupported
                return;
            }
            root.ConfigRead(bus, dev, fn, reg, data);
        }

        public void Write(ulong offset, ReadOnlySpan<byte> data)
        {
            Decode(offset, out int bus, out int dev, out int fn, out int reg);
            if ((reg & (data.Length - 1)) == 0)
                root.ConfigWrite(bus, dev, fn, reg, data);
        }

        private static void Decode(ulong offset, out int bus, out int device, out int function, out int register)
        {
            bus = (int)(offset >> 20) & 0xFF;
            device = (int)(offset >> 15) & 0x1F;
            function = (int)(offset >> 12) & 7;
            register = (int)(offset & 0xFFF);
        }
    }

    private sealed class BarWindow(PciRootBus root, ulong windowStart) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> data)
        {
            if (root.DecodeBar(windowStart + offset, out var f, out int bar, out ulong at))
                f.BarRead(bar, at, data);
            else
                data.Fill(0xFF);
        }

        public void Write(ulong offset, ReadOnlySpan<byte> data)
        {
            if (root.DecodeBar(windowStart + offset, out var f, out int bar, out ulong at))
                f.BarWrite(bar, at, data);
        }
    }
}

/// <summary>A level-triggered interrupt line shared by several PCI functions (INTx on one IOAPIC pin): asserted
/// while any of them asserts it.</summary>
public sealed class SharedInterruptLine(IInterruptLine pin)
{
    private readonly Lock _lock = new();
    private ulong _asserted;
    private ulong _connected;

    /// <summary>A line for one more function; disposing it (hot removal) deasserts it and frees its place.</summary>
    public IInterruptLine Connect()
    {
        lock (_lock)
        {
            if (_connected == ulong.MaxValue)
                throw new PciConfigException("more than 64 functions on one interrupt line");
            int index = System.Numerics.BitOperations.TrailingZeroCount(~_connected);
            _connected |= 1UL << index;
            return new Source(this, index);
        }
    }

    private void Disconnect(int source)
    {
        Set(source, false);
        lock (_lock)
            _connected &= ~(1UL << source);
    }

    private void Set(int source, bool level)
    {
        lock (_lock)
        {
            bool before = _asserted != 0;
            _asserted = level ? _asserted | (1UL << source) : _asserted & ~(1UL << source);
            bool after = _asserted != 0;
            if (before != after)
                pin.SetLevel(after);
        }
    }

    private sealed class Source(SharedInterruptLine line, int index) : IInterruptLine, IDisposable
    {
        private int _disposed;

        public void SetLevel(bool asserted)
        {
            if (Volatile.Read(ref _disposed) == 0)
                line.Set(index, asserted);
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
                line.Disconnect(index);
        }
    }
}
