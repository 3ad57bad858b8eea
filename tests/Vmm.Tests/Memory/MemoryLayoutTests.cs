using Vmm.Memory;
using static Vmm.Memory.MemoryLayout;

namespace Vmm.Tests.Memory;

public class MemoryLayoutTests
{
    [Fact]
    public void The_64_bit_window_starts_above_RAM_and_the_hole_on_a_1_GiB_boundary()
    {
        Assert.Equal(4 * GiB, Pci64WindowStart(128 * MiB));
        Assert.Equal(4 * GiB, Pci64WindowStart(3 * GiB));
        Assert.Equal(6 * GiB, Pci64WindowStart(4 * GiB + 512 * MiB)); // RAM runs to 5.5 GiB
        Assert.Equal((4 * GiB, Pci64DefaultSize), Pci64Window(128 * MiB, []));
    }

    [Fact]
    public void Four_data_center_GPUs_with_128_GiB_BARs_fit_naturally_aligned()
    {
        // Per GPU as an A100 80 GB: BAR1 128 GiB and BAR3 32 MiB, both 64-bit prefetchable.
        ulong[] bars = [.. Enumerable.Repeat(128 * GiB, 4), .. Enumerable.Repeat(32 * MiB, 4)];
        var (start, size) = Pci64Window(128 * MiB, bars);
        Assert.Equal(4 * GiB, start);
        // 128 GiB-aligned: [128, 640) GiB for the four, then the small ones at 640 GiB.
        Assert.Equal(641 * GiB - start, size);
        Assert.Equal(40, PhysicalAddressBits(start + size));
    }

    [Fact]
    public void Small_BARs_keep_the_default_window_and_odd_sizes_are_refused()
    {
        Assert.Equal(Pci64DefaultSize, Pci64Window(128 * MiB, [8 * GiB, 16 * MiB]).Size);
        Assert.Throws<ArgumentException>(() => Pci64Window(128 * MiB, [3 * GiB]));
        Assert.Throws<ArgumentException>(() => Pci64Window(128 * MiB, [1UL << 51, 1UL << 51]));
    }

    [Theory]
    [InlineData(1UL << 32, 32)]
    [InlineData((1UL << 32) + 1, 33)]
    [InlineData(641UL << 30, 40)]
    [InlineData(1UL << 52, 52)]
    public void Physical_address_bits_cover_everything_below_the_end(ulong end, int bits) =>
        Assert.Equal(bits, PhysicalAddressBits(end));
}
