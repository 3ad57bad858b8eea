using System.Security.Cryptography;

namespace Vmm.Tests.TestKit;

/// <summary>The raw disk image the virtio-test guest's blk subtest expects, and what it must look like after
/// the guest ran: sector s starts as bytes (s &amp; 0xFF) ^ 0x5A; the guest writes sectors 100..131 with
/// ((s * 3 + j) &amp; 0xFF) ^ 0xA5, write-zeroes 200..207 and discards 300..307.</summary>
public static class VirtioTestDisk
{
    public const int SectorSize = 512;
    public const int Sectors = 8192; // 4 MiB

    public static byte[] Original()
    {
        var image = new byte[Sectors * SectorSize];
        for (int s = 0; s < Sectors; s++)
            image.AsSpan(s * SectorSize, SectorSize).Fill((byte)((s & 0xFF) ^ 0x5A));
        return image;
    }

    /// <summary>The image after a successful writable run. <paramref name="discardZeroes"/>: the discarded
    /// sectors read back as zeros (vmm punches a hole); otherwise they are left as they were.</summary>
    public static byte[] AfterGuest(bool writeZeroes = true, bool discardZeroes = true)
    {
        var image = Original();
        for (int s = 100; s < 132; s++)
        {
            for (int j = 0; j < SectorSize; j++)
                image[s * SectorSize + j] = (byte)(((s * 3 + j) & 0xFF) ^ 0xA5);
        }
        if (writeZeroes)
            image.AsSpan(200 * SectorSize, 8 * SectorSize).Clear();
        if (discardZeroes)
            image.AsSpan(300 * SectorSize, 8 * SectorSize).Clear();
        return image;
    }

    public static string Sha256(byte[] data) => Convert.ToHexStringLower(SHA256.HashData(data));

    /// <summary>Sectors that differ between two images, for a readable assertion message.</summary>
    public static string Diff(byte[] expected, byte[] actual)
    {
        if (expected.Length != actual.Length)
            return $"size {actual.Length}, expected {expected.Length}";
        var sectors = Enumerable.Range(0, expected.Length / SectorSize)
            .Where(s => !expected.AsSpan(s * SectorSize, SectorSize).SequenceEqual(actual.AsSpan(s * SectorSize, SectorSize)))
            .ToList();
        return sectors.Count == 0 ? "identical" : $"{sectors.Count} sectors differ, first: {string.Join(", ", sectors.Take(10))}";
    }
}
