using Vmm.Memory;

namespace Vmm.Tests.Memory;

public class GuestMemoryTests
{
    [Fact]
    public void Small_memory_is_one_region_from_zero()
    {
        using var mem = GuestMemory.Create(64 * MemoryLayout.MiB);
        var r = Assert.Single(mem.Regions);
        Assert.Equal(0UL, r.Start.Value);
        Assert.Equal(64 * MemoryLayout.MiB, r.Size);
    }

    [Fact]
    public void Memory_beyond_the_MMIO_hole_continues_at_4_GiB()
    {
        // MAP_NORESERVE: 5 GiB of address space costs nothing until touched.
        using var mem = GuestMemory.Create(5 * MemoryLayout.GiB);
        Assert.Equal(2, mem.Regions.Count);
        Assert.Equal(MemoryLayout.MmioHoleStart, mem.Regions[0].Size);
        Assert.Equal(4 * MemoryLayout.GiB, mem.Regions[1].Start.Value);
        Assert.Equal(2 * MemoryLayout.GiB, mem.Regions[1].Size);
        mem.WriteObj(new GuestAddress(5 * MemoryLayout.GiB), 0xDEADBEEFu);
        Assert.Equal(0xDEADBEEFu, mem.ReadObj<uint>(new GuestAddress(5 * MemoryLayout.GiB)));
        Assert.False(mem.IsValidRange(new GuestAddress(MemoryLayout.MmioHoleStart), 1));
    }

    [Fact]
    public void Typed_and_span_access_round_trip()
    {
        using var mem = GuestMemory.Create(2 * MemoryLayout.MiB);
        mem.Write(new GuestAddress(0x1000), "hello"u8);
        mem.WriteObj(new GuestAddress(0x2001), 0x1122334455667788UL); // unaligned is fine
        Span<byte> buf = stackalloc byte[5];
        mem.Read(new GuestAddress(0x1000), buf);
        Assert.Equal("hello"u8.ToArray(), buf.ToArray());
        Assert.Equal(0x1122334455667788UL, mem.ReadObj<ulong>(new GuestAddress(0x2001)));
    }

    [Theory]
    [InlineData(2 * 1024 * 1024UL, 1UL)]          // first byte past the end
    [InlineData(2 * 1024 * 1024UL - 4, 8UL)]      // straddles the end
    [InlineData(ulong.MaxValue - 2, 8UL)]         // wraps around
    [InlineData(0UL, 3 * 1024 * 1024UL)]          // longer than RAM
    public void Out_of_range_access_throws_and_never_touches_host_memory(ulong address, ulong length)
    {
        using var mem = GuestMemory.Create(2 * MemoryLayout.MiB);
        Assert.False(mem.IsValidRange(new GuestAddress(address), length));
        var e = Assert.Throws<GuestMemoryException>(() => mem.Clear(new GuestAddress(address), length));
        Assert.Contains("outside guest RAM", e.Message);
        Assert.False(mem.TryGetSpan(new GuestAddress(address), (int)Math.Min(length, int.MaxValue), out _));
    }

    [Fact]
    public void Rejects_sizes_that_are_not_whole_pages()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => GuestMemory.Create(2 * MemoryLayout.MiB + 1));
    }

    [Fact]
    public void Access_after_dispose_is_refused()
    {
        var mem = GuestMemory.Create(2 * MemoryLayout.MiB);
        mem.Dispose();
        Assert.Throws<ObjectDisposedException>(() => mem.ReadObj<byte>(new GuestAddress(0)));
    }
}
