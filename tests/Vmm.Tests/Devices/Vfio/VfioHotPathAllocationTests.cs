using System.Buffers.Binary;
using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.User;
using Vmm.Interop;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>"The vCPU hot path allocates nothing", for passed-through devices: a guest driver polling a register of a
/// trapped BAR exits on every access, and each exit becomes a region read or write. These tests run such accesses
/// against the real vfio-user test GPU process (docs/test-gpu.md) on a thread of their own, as a vCPU would, and
/// count what that thread allocates (<see cref="GC.GetAllocatedBytesForCurrentThread"/>) after a warm-up that lets
/// the JIT tier up and the client's buffers grow.</summary>
public sealed class VfioHotPathAllocationTests : IDisposable
{
    private const uint RegId = 0x00, RegScratch = 0x08;
    private const uint TestGpuId = 0x4750_5530;
    private const int Accesses = 1000;

    private readonly TestGpuServer _server = TestGpuServer.Start();
    private readonly List<IDisposable> _cleanup = [];

    public void Dispose()
    {
        for (int i = _cleanup.Count - 1; i >= 0; i--)
            _cleanup[i].Dispose();
        _server.Dispose();
    }

    private VfioUserClient Connect()
    {
        var client = VfioUserClient.Connect(_server.SocketPath);
        _cleanup.Add(client);
        return client;
    }

    /// <summary>Runs <paramref name="run"/> on a new thread: three warm-up rounds (with pauses, so tiered compilation
    /// finishes in the background), then one measured round. Returns the bytes the thread allocated in the measured
    /// round; an exception on the thread fails the test.</summary>
    private static long AllocatedByMeasuredRound(Action run)
    {
        long allocated = -1;
        Exception? failure = null;
        var thread = new Thread(() =>
        {
            try
            {
                for (int round = 0; round < 3; round++)
                {
                    run();
                    Thread.Sleep(150);
                }
                long before = GC.GetAllocatedBytesForCurrentThread();
                run();
                allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            }
            catch (Exception e)
            {
                failure = e;
            }
        }) { Name = "stand-in vCPU" };
        thread.Start();
        thread.Join();
        if (failure is not null)
            throw new Xunit.Sdk.XunitException("the access thread failed: " + failure);
        return allocated;
    }

    [Fact]
    public void Vfio_user_region_reads_and_writes_of_a_bar0_register_allocate_nothing()
    {
        var d = Connect();
        int mismatches = 0, reads = 0;
        long allocated = AllocatedByMeasuredRound(() =>
        {
            Span<byte> value = stackalloc byte[4];
            for (int i = 0; i < Accesses; i++)
            {
                uint written = (uint)i * 2654435761u;
                BinaryPrimitives.WriteUInt32LittleEndian(value, written);
                d.WriteRegion(0, RegScratch, value);
                value.Clear();
                d.ReadRegion(0, RegScratch, value);
                mismatches += BinaryPrimitives.ReadUInt32LittleEndian(value) == written ? 0 : 1;
                reads++;
            }
        });
        Assert.Equal(0, mismatches); // every read saw the value written just before: the accesses really went through
        Assert.Equal(4 * Accesses, reads);
        Assert.Equal(0, allocated);
    }

    [Fact]
    public void Vfio_user_region_reads_stay_allocation_free_across_reply_sizes()
    {
        // A bigger read grows the reply buffer once; after that, small and big reads alike reuse it.
        var d = Connect();
        int wrongIds = 0;
        long allocated = AllocatedByMeasuredRound(() =>
        {
            Span<byte> config = stackalloc byte[256];
            Span<byte> id = stackalloc byte[4];
            for (int i = 0; i < Accesses / 4; i++)
            {
                d.ReadRegion(VfioRegionIndex.Config, 0, config);
                d.ReadRegion(0, RegId, id);
                wrongIds += BinaryPrimitives.ReadUInt32LittleEndian(id) == TestGpuId
                    && BinaryPrimitives.ReadUInt16LittleEndian(config) == 0x1B36 ? 0 : 1;
            }
        });
        Assert.Equal(0, wrongIds);
        Assert.Equal(0, allocated);
    }

    [Fact]
    public void Trapped_bar_and_config_accesses_of_a_vfio_pci_function_on_vfio_user_allocate_nothing()
    {
        var function = new VfioPciFunction(Connect(), new RecordingMsiController(), new RecordingGuestMemoryMapper(), null, null);
        _cleanup.RemoveAt(_cleanup.Count - 1); // the function owns and disposes the client
        _cleanup.Add(function);
        Assert.NotNull(function.Msix);
        int mismatches = 0;
        long allocated = AllocatedByMeasuredRound(() =>
        {
            Span<byte> value = stackalloc byte[4];
            Span<byte> one = stackalloc byte[1];
            for (int i = 0; i < Accesses; i++)
            {
                // BAR0 below 0x10000 is not mmappable on the test GPU: SCRATCH traps.
                uint written = (uint)i * 2654435761u;
                BinaryPrimitives.WriteUInt32LittleEndian(value, written);
                function.BarWrite(0, RegScratch, value);
                value.Clear();
                function.BarRead(0, RegScratch, value);
                mismatches += BinaryPrimitives.ReadUInt32LittleEndian(value) == written ? 0 : 1;

                if (i % 10 != 0)
                    continue;
                // Config space: class code/revision passes through; cache line size is a device-writable byte
                // (a read-merge-write of the device's register); the MSI-X table is vmm's emulation.
                function.ConfigRead(0x08, value);
                mismatches += BinaryPrimitives.ReadUInt32LittleEndian(value) == 0x0302_0001 ? 0 : 1;
                one[0] = (byte)(i / 10 % 64);
                function.ConfigWrite(0x0C, one);
                one[0] = 0xEE;
                function.ConfigRead(0x0C, one);
                mismatches += one[0] == (byte)(i / 10 % 64) ? 0 : 1;
                function.BarRead(0, 0x1000 + 12, value); // vector 0 control: masked at reset
                mismatches += BinaryPrimitives.ReadUInt32LittleEndian(value) == 1 ? 0 : 1;
            }
        });
        Assert.Equal(0, mismatches);
        Assert.Equal(0, function.ErrorCount);
        Assert.Equal(0, allocated);
    }

    [Fact]
    public void Positioned_file_reads_and_writes_allocate_nothing()
    {
        // KernelVfioDevice's region path is a cached region lookup and FileIo.ReadAt/WriteAt (pread/pwrite at the
        // region's offset in the device fd). The device itself needs a VFIO fd (its constructor asks the kernel for
        // VFIO_DEVICE_GET_INFO), so this checks the part below it over a regular file.
        string path = Path.GetTempFileName();
        int fd = Sys.Open(path, Sys.O_RDWR | Sys.O_CLOEXEC);
        Assert.True(fd >= 0, $"open {path}: errno {Errno.Last}");
        try
        {
            int mismatches = 0;
            long allocated = AllocatedByMeasuredRound(() =>
            {
                Span<byte> value = stackalloc byte[4];
                for (int i = 0; i < Accesses; i++)
                {
                    BinaryPrimitives.WriteUInt32LittleEndian(value, (uint)i);
                    long written = FileIo.WriteAt(fd, value, 4096 + 8);
                    value.Clear();
                    long read = FileIo.ReadAt(fd, value, 4096 + 8);
                    mismatches += written == 4 && read == 4 && BinaryPrimitives.ReadUInt32LittleEndian(value) == (uint)i ? 0 : 1;
                }
            });
            Assert.Equal(0, mismatches);
            Assert.Equal(0, allocated);
        }
        finally
        {
            Sys.Close(fd);
            File.Delete(path);
        }
    }
}
