using System.Buffers.Binary;

namespace Vmm.Tests.TestKit;

/// <summary>What guest-images/vfio-gpu-test writes into the test GPU's BAR2 and BAR0 SRAM (mirrors its guest.c),
/// so tests can check the host side (ivshmem's backing file under QEMU, the test GPU server's memfd and report
/// under vmm). All dwords little-endian; every other byte of BAR2 stays as it was (zero in a fresh memfd or
/// sparse file).</summary>
public static class VfioGpuTestGuest
{
    public const ulong GiB = 1UL << 30;
    /// <summary>Bytes of each block the guest writes through its BAR mappings.</summary>
    public const int Block = 64;
    /// <summary>Where COPY_TO_BAR2 puts 4096 bytes of <see cref="BufferPattern"/> (full flow only).</summary>
    public const ulong CopyToBar2Offset = 0x1000;
    /// <summary>Where the second COPY_TO_BAR2 puts 64 bytes of <see cref="BufferPattern"/> (full flow only).</summary>
    public const ulong CopyToBar2HighOffset = 4 * GiB + 0x1000;
    public const uint SramOffset = 0x10000;

    /// <summary>The dword the guest writes at BAR2 offset <paramref name="offset"/>: the offset's high half is in
    /// it, so a write that lost bit 32+ of its address shows up as a wrong value.</summary>
    public static uint Bar2Pattern(ulong offset) => (uint)offset ^ ((uint)(offset >> 32) << 24) ^ 0x6B000000u;

    /// <summary>Dword i of the guest's DMA source buffer.</summary>
    public static uint BufferPattern(uint i) => 0xC0DE0000u ^ unchecked(i * 0x9E3779B1u);

    public static uint SramPattern(uint bar0Offset) => bar0Offset ^ 0x52A30000u;

    /// <summary>The four 64-byte BAR2 blocks of <see cref="Bar2Pattern"/>: offset 0, 4 GiB - 4096, across the
    /// 4 GiB line, and the last 64 bytes.</summary>
    public static ulong[] Bar2Blocks(ulong bar2Size) => [0, 4 * GiB - 4096, 4 * GiB - Block / 2, bar2Size - Block];

    /// <summary>The BAR0 SRAM blocks (64 bytes of <see cref="SramPattern"/> each), by BAR0 offset.</summary>
    public static uint[] SramBlocks(uint bar0Size) => [SramOffset, bar0Size - Block];

    /// <summary>BAR2 bytes [offset, offset + length) after a passing run. <paramref name="fullFlow"/>: the
    /// GPU run with DMA (adds the COPY_TO_BAR2 data); false: `tests=bar-only` (the ivshmem cross-check).</summary>
    public static byte[] ExpectedBar2(ulong bar2Size, ulong offset, int length, bool fullFlow)
    {
        var bytes = new byte[length];
        void Put(ulong at, uint value)
        {
            if (at >= offset && at + 4 <= offset + (ulong)length)
                BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan((int)(at - offset)), value);
        }
        foreach (ulong b in Bar2Blocks(bar2Size))
        {
            for (ulong i = 0; i < Block; i += 4)
                Put(b + i, Bar2Pattern(b + i));
        }
        if (fullFlow)
        {
            for (uint i = 0; i < 1024; i++)
                Put(CopyToBar2Offset + 4 * i, BufferPattern(i));
            for (uint i = 0; i < Block / 4; i++)
                Put(CopyToBar2HighOffset + 4 * i, BufferPattern(i));
        }
        return bytes;
    }

    /// <summary>p2p (cmdline `p2p`): where the guest writes 4096 bytes of <see cref="P2pPattern"/> into GPU2's BAR2
    /// for GPU1 to copy from.</summary>
    public const ulong P2pSourceOffset = 0x4000;
    /// <summary>p2p: GPU1 copies 4096 bytes of <see cref="P2pRamPattern"/> to GPU2's BAR2 at size minus this, with
    /// 64 bytes of <see cref="Guard"/> written by the guest either side.</summary>
    public const ulong P2pDestinationFromEnd = 0xC000;
    public const uint Guard = 0xDEADBEEFu;

    public static uint P2pPattern(ulong offset) => (uint)offset ^ ((uint)(offset >> 32) << 24) ^ 0x2D000000u;

    public static uint P2pRamPattern(uint i) => 0x5EE20000u ^ unchecked(i * 0x85EBCA6Bu);

    /// <summary>GPU2's BAR2 bytes [offset, offset + length) after a passing `p2p` run (GPU2 is only the peer: the
    /// guest runs nothing else on it).</summary>
    public static byte[] ExpectedPeerBar2(ulong bar2Size, ulong offset, int length)
    {
        var bytes = new byte[length];
        void Put(ulong at, uint value)
        {
            if (at >= offset && at + 4 <= offset + (ulong)length)
                BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan((int)(at - offset)), value);
        }
        for (uint i = 0; i < 1024; i++)
            Put(P2pSourceOffset + 4 * i, P2pPattern(P2pSourceOffset + 4 * i));
        ulong destination = bar2Size - P2pDestinationFromEnd;
        for (uint i = 0; i < Block / 4; i++)
        {
            Put(destination - Block + 4 * i, Guard);
            Put(destination + 4096 + 4 * i, Guard);
        }
        for (uint i = 0; i < 1024; i++)
            Put(destination + 4 * i, P2pRamPattern(i));
        return bytes;
    }

    /// <summary><see cref="Bar2Fnv"/> after a Linux guest wrote 0x600D0001 to the first dword of BAR2 and 0x600D0002 to
    /// the last through /dev/mem (the gpu and hotplug initramfs scripts), nothing else.</summary>
    public static string Bar2FnvOfFirstAndLastDword(ulong bar2Size) => Bar2Fnv(bar2Size, (offset, length) =>
    {
        var bytes = new byte[length];
        if (offset == 0)
            BinaryPrimitives.WriteUInt32LittleEndian(bytes, 0x600D0001);
        else
            BinaryPrimitives.WriteUInt32LittleEndian(bytes.AsSpan(length - 4), 0x600D0002);
        return bytes;
    });

    /// <summary>The test GPU server's <c>bar2_fnv</c> report value (FNV-1a 64 over the first 64 KiB, then the last
    /// 64 KiB of BAR2) for a BAR2 of <paramref name="bar2Size"/> bytes holding <paramref name="contents"/>
    /// (offset → bytes; everything else zero).</summary>
    public static string Bar2Fnv(ulong bar2Size, Func<ulong, int, byte[]> contents)
    {
        const int Window = 64 << 10;
        ulong h = Fnv1a(0xcbf29ce484222325, contents(0, Window));
        h = Fnv1a(h, contents(bar2Size - Window, Window));
        return h.ToString("x16", System.Globalization.CultureInfo.InvariantCulture);
    }

    public static ulong Fnv1a(ulong h, ReadOnlySpan<byte> data)
    {
        foreach (byte b in data)
            h = (h ^ b) * 0x100000001b3;
        return h;
    }
}
