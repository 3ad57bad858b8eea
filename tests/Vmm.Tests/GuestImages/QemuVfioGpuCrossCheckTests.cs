using Vmm.Tests.TestKit;

namespace Vmm.Tests.GuestImages;

/// <summary>The large-BAR part of the vfio-gpu-test guest (a 64-bit prefetchable BAR of 8 GiB placed above
/// 4 GiB, reached through PAE paging from a 32-bit guest) under QEMU, with ivshmem-plain standing in for the test
/// GPU: QEMU 7.2 has no vfio-user client, so the DMA and interrupt parts run only under vmm. The backing file
/// must afterwards hold the guest's patterns at the BAR offsets it wrote.</summary>
// In the kvm collection: not in parallel with the nested KVM run, whose emulated CPU the QEMU runs would starve.
[Collection("kvm")]
public class QemuVfioGpuCrossCheckTests
{
    private static string Guest => Repo.PathTo("guest-images", "build", "vfio-gpu-test.elf");

    /// <summary>Runs the guest against an ivshmem-plain device whose BAR2 is a sparse file of this size.</summary>
    private static Repo.Result RunWithIvshmem(string backingFile, ulong size)
    {
        Repo.MustRun("make", "-s", "-C", Repo.PathTo("guest-images"));
        using (var f = new FileStream(backingFile, FileMode.Create, FileAccess.Write))
            f.SetLength((long)size); // sparse: only the pages the guest writes take memory
        return Repo.Run("qemu-system-x86_64",
        [
            "-M", "q35", "-accel", VmmRunner.QemuAccel, "-m", "128", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-nic", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", Guest,
            "-append", "device=1af4:1110 tests=bar-only",
            "-object", $"memory-backend-file,id=bar2mem,size={size},mem-path={backingFile},share=on",
            "-device", "ivshmem-plain,memdev=bar2mem",
        ], timeout: TimeSpan.FromMinutes(3));
    }

    private static string BackingFile() =>
        Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), $"vmm-ivshmem-{Guid.NewGuid():N}");

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    private static byte[] ReadAt(string file, ulong offset, int length)
    {
        using var f = new FileStream(file, FileMode.Open, FileAccess.Read);
        f.Position = (long)offset;
        var bytes = new byte[length];
        f.ReadExactly(bytes);
        return bytes;
    }

    [Fact]
    public void Eight_GiB_BAR_above_4_GiB_is_written_through_PAE_windows_under_QEMU()
    {
        const ulong size = 8 * VfioGpuTestGuest.GiB;
        string file = BackingFile();
        try
        {
            var r = RunWithIvshmem(file, size);
            Assert.True(r.ExitCode == 1, Show(r));
            foreach (var line in new[] { "find ok", "bars ok", "enable ok", "paging ok", "bar2 ok", "all ok" })
                Assert.Contains("vfio-gpu: " + line + "\n", r.Stdout);
            Assert.DoesNotContain("FAIL", r.Stdout);
            // SeaBIOS puts the 8 GiB BAR at 8 GiB; the guest only needs it at or above 4 GiB.
            Assert.Matches(@"vfio-gpu: bar2 mem64 0x[2-9a-f][0-9a-f]{8,} size 0x200000000 prefetchable", r.Stdout);

            // Each block with 64 bytes either side: the patterns where the guest wrote, zeros around them.
            foreach (ulong block in VfioGpuTestGuest.Bar2Blocks(size))
            {
                ulong from = block >= 64 ? block - 64 : 0;
                int length = (int)(Math.Min(block + 128, size) - from);
                byte[] expected = VfioGpuTestGuest.ExpectedBar2(size, from, length, fullFlow: false);
                byte[] actual = ReadAt(file, from, length);
                Assert.True(expected.AsSpan().SequenceEqual(actual),
                    $"backing file at 0x{from:x}: want {Convert.ToHexString(expected)}\n got {Convert.ToHexString(actual)}");
            }
            // The block across 4 GiB really spans it, and the last block ends with the BAR's last dword.
            Assert.Equal(VfioGpuTestGuest.Bar2Pattern(4 * VfioGpuTestGuest.GiB),
                BitConverter.ToUInt32(ReadAt(file, 4 * VfioGpuTestGuest.GiB, 4)));
            Assert.Equal(VfioGpuTestGuest.Bar2Pattern(size - 4), BitConverter.ToUInt32(ReadAt(file, size - 4, 4)));
        }
        finally
        {
            File.Delete(file);
        }
    }

    [Fact]
    public void A_BAR_under_4_GiB_fails_the_guest_with_its_size()
    {
        string file = BackingFile();
        try
        {
            var r = RunWithIvshmem(file, 2 * VfioGpuTestGuest.GiB);
            Assert.True(r.ExitCode == 3, Show(r));
            Assert.Contains("vfio-gpu: FAIL bars: BAR2 size 0x80000000: want a power of two >= 4 GiB", r.Stdout);
            Assert.DoesNotContain("all ok", r.Stdout);
        }
        finally
        {
            File.Delete(file);
        }
    }
}
