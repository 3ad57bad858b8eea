using Vmm.Devices;

namespace Vmm.Tests.Devices;

public class BusTests
{
    private sealed class Recorder : IBusDevice
    {
        public List<(char Op, ulong Offset, int Width)> Accesses { get; } = [];
        public void Read(ulong offset, Span<byte> data) { Accesses.Add(('r', offset, data.Length)); data.Fill(0x5A); }
        public void Write(ulong offset, ReadOnlySpan<byte> data) => Accesses.Add(('w', offset, data.Length));
    }

    [Fact]
    public void Dispatches_to_the_device_covering_the_address_with_the_offset_into_its_range()
    {
        var bus = new Bus("test");
        var a = new Recorder();
        var b = new Recorder();
        bus.Insert(a, 0x3F8, 8);
        bus.Insert(b, 0x60, 5);
        Span<byte> data = stackalloc byte[2];
        Assert.True(bus.Read(0x3FD, data));
        Assert.True(bus.Write(0x64, data[..1]));
        Assert.Equal([('r', 5UL, 2)], a.Accesses);
        Assert.Equal([('w', 4UL, 1)], b.Accesses);
        Assert.Equal(0x5A, data[0]);
    }

    [Fact]
    public void Lookup_finds_every_device_among_many()
    {
        var bus = new Bus("test");
        var devices = Enumerable.Range(0, 100).Select(_ => new Recorder()).ToArray();
        // Insert out of order: the table must stay sorted.
        foreach (int i in Enumerable.Range(0, 100).Reverse())
            bus.Insert(devices[i], (ulong)i * 0x10, 0x8);
        for (int i = 0; i < 100; i++)
        {
            Assert.Same(devices[i], bus.Resolve((ulong)i * 0x10 + 7, out ulong off));
            Assert.Equal(7UL, off);
            Assert.Null(bus.Resolve((ulong)i * 0x10 + 8, out _));
        }
    }

    [Theory]
    [InlineData(0x3F8UL, 8UL)]
    [InlineData(0x3F0UL, 9UL)]
    [InlineData(0x3FFUL, 1UL)]
    [InlineData(0x3F0UL, 0x20UL)]
    public void Rejects_overlapping_ranges(ulong start, ulong length)
    {
        var bus = new Bus("I/O port");
        bus.Insert(new Recorder(), 0x3F8, 8);
        var e = Assert.Throws<BusException>(() => bus.Insert(new Recorder(), start, length));
        Assert.Contains("overlaps", e.Message);
        Assert.Contains("0x3f8-0x3ff", e.Message);
    }

    [Fact]
    public void Rejects_empty_and_overflowing_ranges()
    {
        var bus = new Bus("MMIO");
        Assert.Contains("empty", Assert.Throws<BusException>(() => bus.Insert(new Recorder(), 0x1000, 0)).Message);
        Assert.Contains("overflows", Assert.Throws<BusException>(() => bus.Insert(new Recorder(), ulong.MaxValue - 1, 4)).Message);
    }

    [Fact]
    public void Unclaimed_reads_return_all_ones_and_are_counted_per_address()
    {
        var bus = new Bus("I/O port");
        Span<byte> data = stackalloc byte[4];
        Assert.False(bus.Read(0x2F8, data));
        Assert.Equal(0xFFFFFFFFu, BitConverter.ToUInt32(data));
        Assert.False(bus.Write(0x2F8, data[..1]));
        Assert.False(bus.Write(0x61, data[..1]));
        Assert.Equal(1, bus.UnclaimedReads);
        Assert.Equal(2, bus.UnclaimedWrites);
        Assert.Equal([(0x2F8UL, 2L), (0x61UL, 1L)], bus.UnclaimedAccesses());
    }
}
