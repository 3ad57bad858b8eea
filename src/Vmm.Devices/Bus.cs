using System.Runtime.CompilerServices;

namespace Vmm.Devices;

/// <summary>A half-open address range [Base, Base + Length) on a bus.</summary>
public readonly record struct BusRange(ulong Base, ulong Length)
{
    public ulong End => Base + Length;

    public bool Overlaps(BusRange other) => Base < other.End && other.Base < End;

    public override string ToString() => $"0x{Base:x}-0x{End - 1:x}";
}

/// <summary>A bad bus registration: empty, overflowing or overlapping ranges.</summary>
public sealed class BusException(string message) : Exception(message);

/// <summary>Routes accesses by address to devices. The device table is an immutable array sorted by base
/// address, swapped atomically on insert, so lookups (binary search, O(log n)) take no lock and allocate
/// nothing. Unclaimed accesses read all-ones, drop writes and are counted.</summary>
public sealed class Bus(string name)
{
    private readonly record struct Entry(BusRange Range, IBusDevice Device);

    private Entry[] _entries = [];
    private readonly Lock _insertLock = new();
    private long _unclaimedReads;
    private long _unclaimedWrites;
    // The first few unclaimed addresses, recorded without allocation for --log-level debug.
    private readonly ulong[] _unclaimedAddresses = new ulong[32];
    private readonly long[] _unclaimedCounts = new long[32];
    private int _unclaimedDistinct;

    public string Name { get; } = name;

    public long UnclaimedReads => Interlocked.Read(ref _unclaimedReads);

    public long UnclaimedWrites => Interlocked.Read(ref _unclaimedWrites);

    /// <summary>Registers <paramref name="device"/> for [<paramref name="baseAddress"/>, +<paramref name="length"/>).</summary>
    public void Insert(IBusDevice device, ulong baseAddress, ulong length)
    {
        if (length == 0)
            throw new BusException($"{Name} bus: cannot register an empty range at 0x{baseAddress:x} for {device.GetType().Name}");
        if (baseAddress + length < baseAddress)
            throw new BusException($"{Name} bus: range 0x{baseAddress:x}+0x{length:x} for {device.GetType().Name} overflows the address space");
        var range = new BusRange(baseAddress, length);
        lock (_insertLock)
        {
            foreach (var e in _entries)
            {
                if (e.Range.Overlaps(range))
                    throw new BusException($"{Name} bus: {device.GetType().Name} at {range} overlaps {e.Device.GetType().Name} at {e.Range}");
            }
            var next = new Entry[_entries.Length + 1];
            _entries.CopyTo(next, 0);
            next[^1] = new Entry(range, device);
            Array.Sort(next, (a, b) => a.Range.Base.CompareTo(b.Range.Base));
            Volatile.Write(ref _entries, next);
        }
    }

    /// <summary>The device covering <paramref name="address"/> and the offset into its range, if any.</summary>
    public IBusDevice? Resolve(ulong address, out ulong offset)
    {
        var entries = Volatile.Read(ref _entries);
        int lo = 0, hi = entries.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            ref readonly var e = ref entries[mid];
            if (address < e.Range.Base)
                hi = mid - 1;
            else if (address >= e.Range.End)
                lo = mid + 1;
            else
            {
                offset = address - e.Range.Base;
                return e.Device;
            }
        }
        offset = 0;
        return null;
    }

    /// <summary>Dispatches a read. Returns false (and fills all-ones) when no device claims the address.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool Read(ulong address, Span<byte> data)
    {
        var device = Resolve(address, out ulong offset);
        if (device is null)
        {
            data.Fill(0xFF);
            Interlocked.Increment(ref _unclaimedReads);
            RecordUnclaimed(address);
            return false;
        }
        device.Read(offset, data);
        return true;
    }

    /// <summary>Dispatches a write. Returns false (and drops it) when no device claims the address.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool Write(ulong address, ReadOnlySpan<byte> data)
    {
        var device = Resolve(address, out ulong offset);
        if (device is null)
        {
            Interlocked.Increment(ref _unclaimedWrites);
            RecordUnclaimed(address);
            return false;
        }
        device.Write(offset, data);
        return true;
    }

    private void RecordUnclaimed(ulong address)
    {
        lock (_insertLock)
        {
            for (int i = 0; i < _unclaimedDistinct; i++)
            {
                if (_unclaimedAddresses[i] == address)
                {
                    _unclaimedCounts[i]++;
                    return;
                }
            }
            if (_unclaimedDistinct < _unclaimedAddresses.Length)
            {
                _unclaimedAddresses[_unclaimedDistinct] = address;
                _unclaimedCounts[_unclaimedDistinct++] = 1;
            }
        }
    }

    /// <summary>Unclaimed addresses seen (the first 32 distinct ones) and how often each was accessed.</summary>
    public IReadOnlyList<(ulong Address, long Count)> UnclaimedAccesses()
    {
        lock (_insertLock)
        {
            var list = new List<(ulong, long)>();
            for (int i = 0; i < _unclaimedDistinct; i++)
                list.Add((_unclaimedAddresses[i], _unclaimedCounts[i]));
            return list;
        }
    }

    /// <summary>The registered ranges and their devices, in address order (for diagnostics).</summary>
    public IReadOnlyList<(BusRange Range, IBusDevice Device)> Devices =>
        Volatile.Read(ref _entries).Select(e => (e.Range, e.Device)).ToList();
}
