using System.Buffers.Binary;
using System.Text;
using Vmm.Devices.VhostUser;
using Vmm.Devices.Virtio;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.VhostUser;

/// <summary>The device against the real back-ends of this host, without KVM: the test is the driver — it lays
/// out split virtqueues in guest memory (memfd, shared with the back-end), activates the device, posts requests
/// and kicks the queue's eventfd as KVM's ioeventfd would; completions come back through the call eventfd.
/// qemu-storage-daemon: a write, a read and a flush, checked in the image file. virtiofsd: FUSE_INIT, then
/// FUSE_LOOKUP / OPEN / READ of a file created on the host.</summary>
[Collection("vhost-user back-ends")]
public sealed class VhostUserBackendTests : IDisposable
{
    private const int Sector = 512;
    private readonly string _dir = Directory.CreateTempSubdirectory("vmm-vhost-").FullName;
    private readonly GuestMemory _memory = GuestMemory.Create(16 << 20);
    private ulong _heap = 0x100000;

    public void Dispose()
    {
        _memory.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    private ulong Alloc(int length)
    {
        ulong at = _heap;
        _heap += (ulong)((length + 4095) & ~4095);
        return at;
    }

    private static void Complete(DriverQueue queue, int count, RecordingVirtioInterrupts interrupts, VhostUserBackendProcess backend)
    {
        queue.Kick.Signal(); // what the guest's notify write does through the KVM ioeventfd
        Assert.True(queue.WaitUsed(count), $"the back-end did not complete request {count}; its output:\n{backend.Output}");
        Assert.Empty(interrupts.NeedsResetReasons);
    }

    // ---- virtio-blk (qemu-storage-daemon) ----

    private const uint BlkIn = 0, BlkOut = 1, BlkFlush = 4;
    private const int BlkFeatureFlush = 9;

    private (ushort Head, ulong Status) BlockRequest(DriverQueue queue, uint type, ulong sector, ulong data, int length, bool write)
    {
        ulong header = Alloc(16), status = Alloc(1);
        var h = new byte[16];
        BinaryPrimitives.WriteUInt32LittleEndian(h, type);
        BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(8), sector);
        _memory.Write(new GuestAddress(header), h);
        _memory.Write(new GuestAddress(status), [0xFF]);
        var buffers = new List<(ulong, uint, bool)> { (header, 16, false) };
        if (length > 0)
            buffers.Add((data, (uint)length, !write));
        buffers.Add((status, 1, true));
        return (queue.AddChain([.. buffers]), status);
    }

    [Fact]
    public void Qemu_storage_daemon_writes_reads_and_flushes_the_image()
    {
        string image = Path.Combine(_dir, "disk.img");
        var initial = new byte[1 << 20];
        new Random(7).NextBytes(initial);
        File.WriteAllBytes(image, initial);
        using var backend = VhostUserBackendProcess.StartStorageDaemon(Path.Combine(_dir, "blk.sock"), image);
        using var device = VhostUserDevice.CreateBlock(backend.SocketPath);

        var config = new byte[8];
        device.ReadConfig(0, config);
        Assert.Equal((ulong)(initial.Length / Sector), BinaryPrimitives.ReadUInt64LittleEndian(config)); // capacity in sectors
        Assert.True(VirtioFeatures.Has(device.OfferedFeatures, BlkFeatureFlush));
        Assert.True(VirtioFeatures.Has(device.OfferedFeatures, VirtioFeatures.Version1));
        Assert.False(VirtioFeatures.Has(device.OfferedFeatures, 30));

        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        device.Activate(DriverQueue.Context(_memory, (1UL << VirtioFeatures.Version1) | (1UL << BlkFeatureFlush), interrupts, queue));
        Assert.Empty(interrupts.NeedsResetReasons);

        // Write sectors 2-3.
        var pattern = Enumerable.Range(0, 2 * Sector).Select(i => (byte)(i * 7 + 3)).ToArray();
        ulong data = Alloc(pattern.Length);
        _memory.Write(new GuestAddress(data), pattern);
        var (head, status) = BlockRequest(queue, BlkOut, 2, data, pattern.Length, write: true);
        Complete(queue, 1, interrupts, backend);
        Assert.Equal(head, (ushort)queue.Used(0).Id);
        Assert.Equal(0, _memory.ReadObj<byte>(new GuestAddress(status))); // VIRTIO_BLK_S_OK

        // Flush, then the image on the host has the sectors.
        (_, status) = BlockRequest(queue, BlkFlush, 0, 0, 0, write: false);
        Complete(queue, 2, interrupts, backend);
        Assert.Equal(0, _memory.ReadObj<byte>(new GuestAddress(status)));
        var onDisk = File.ReadAllBytes(image);
        Assert.Equal(pattern, onDisk[(2 * Sector)..(4 * Sector)]);
        Assert.Equal(initial[..(2 * Sector)], onDisk[..(2 * Sector)]);

        // Read sectors 1-2: the host's sector 1 and what we wrote to sector 2.
        ulong readBuffer = Alloc(2 * Sector);
        (head, status) = BlockRequest(queue, BlkIn, 1, readBuffer, 2 * Sector, write: false);
        Complete(queue, 3, interrupts, backend);
        Assert.Equal(0, _memory.ReadObj<byte>(new GuestAddress(status)));
        Assert.Equal((uint)(2 * Sector + 1), queue.Used(2).Length); // data + status byte written
        var read = new byte[2 * Sector];
        _memory.Read(new GuestAddress(readBuffer), read);
        Assert.Equal(initial[Sector..(2 * Sector)], read[..Sector]);
        Assert.Equal(pattern[..Sector], read[Sector..]);

        // Completions came back through the call eventfd (relayed: no irqfd without KVM).
        Assert.True(interrupts.QueueInterrupts >= 1, "no interrupt for the completions");

        // Reset: GET_VRING_BASE stops the ring and reports where the back-end got to.
        device.Deactivate();
        Assert.Null(device.Failure);
        Assert.False(backend.HasExited, backend.Output);
    }

    [Fact]
    public void A_killed_back_end_puts_the_device_in_needs_reset()
    {
        string image = Path.Combine(_dir, "disk.img");
        File.WriteAllBytes(image, new byte[1 << 20]);
        using var backend = VhostUserBackendProcess.StartStorageDaemon(Path.Combine(_dir, "blk.sock"), image);
        using var device = VhostUserDevice.CreateBlock(backend.SocketPath);
        using var queue = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        device.Activate(DriverQueue.Context(_memory, 1UL << VirtioFeatures.Version1, interrupts, queue));
        backend.Kill();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (interrupts.NeedsResetReasons.IsEmpty && sw.Elapsed < TimeSpan.FromSeconds(5))
            Thread.Sleep(5);
        Assert.Equal($"vhost-user back-end {backend.SocketPath} closed the connection", Assert.Single(interrupts.NeedsResetReasons));
        device.Deactivate(); // returns at once: nothing left to stop
    }

    // ---- virtio-fs (virtiofsd) ----

    private const uint FuseLookup = 1, FuseOpen = 14, FuseRead = 15, FuseInit = 26;
    private const int InHeaderSize = 40, OutHeaderSize = 16;
    private ulong _unique = 1;

    /// <summary>Posts one FUSE request (in header + <paramref name="body"/>) with a reply buffer of
    /// <paramref name="replySize"/> bytes; returns the reply (out header included) cut to what the back-end wrote.</summary>
    private byte[] Fuse(DriverQueue queue, int completed, RecordingVirtioInterrupts interrupts, VhostUserBackendProcess backend,
        uint opcode, ulong nodeId, byte[] body, int replySize)
    {
        var request = new byte[InHeaderSize + body.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(request, (uint)request.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(request.AsSpan(4), opcode);
        ulong unique = _unique++;
        BinaryPrimitives.WriteUInt64LittleEndian(request.AsSpan(8), unique);
        BinaryPrimitives.WriteUInt64LittleEndian(request.AsSpan(16), nodeId);
        body.CopyTo(request, InHeaderSize);
        ulong input = Alloc(request.Length), output = Alloc(replySize);
        _memory.Write(new GuestAddress(input), request);
        queue.AddChain((input, (uint)request.Length, false), (output, (uint)replySize, true));
        Complete(queue, completed, interrupts, backend);
        uint written = queue.Used(completed - 1).Length;
        Assert.InRange(written, (uint)OutHeaderSize, (uint)replySize);
        var reply = new byte[written];
        _memory.Read(new GuestAddress(output), reply);
        Assert.Equal(written, BinaryPrimitives.ReadUInt32LittleEndian(reply)); // out header len = bytes written
        Assert.Equal(0, BinaryPrimitives.ReadInt32LittleEndian(reply.AsSpan(4))); // error
        Assert.Equal(unique, BinaryPrimitives.ReadUInt64LittleEndian(reply.AsSpan(8)));
        return reply;
    }

    [Fact]
    public void Virtiofsd_answers_fuse_init_lookup_open_and_read()
    {
        string shared = Directory.CreateDirectory(Path.Combine(_dir, "shared")).FullName;
        string text = "hello from the host through virtiofsd\n";
        File.WriteAllText(Path.Combine(shared, "hello.txt"), text);
        using var backend = VhostUserBackendProcess.StartVirtiofsd(Path.Combine(_dir, "fs.sock"), shared);
        using var device = VhostUserDevice.CreateFs(backend.SocketPath, "hostshare", requestQueues: 1, queueSize: 128);
        Assert.Equal(2, device.QueueCount);
        Assert.True(VirtioFeatures.Has(device.OfferedFeatures, VirtioFeatures.Version1));

        using var hiprio = new DriverQueue(_memory, 0x10000, 128, maxSize: 128);
        using var requests = new DriverQueue(_memory, 0x20000, 128, maxSize: 128);
        var interrupts = new RecordingVirtioInterrupts();
        device.Activate(DriverQueue.Context(_memory, 1UL << VirtioFeatures.Version1, interrupts, hiprio, requests));
        Assert.Empty(interrupts.NeedsResetReasons);

        // FUSE_INIT: fuse_init_in {major 7, minor 31, max_readahead, flags} and the 7.36 tail (flags2, unused).
        var init = new byte[64];
        BinaryPrimitives.WriteUInt32LittleEndian(init, 7);
        BinaryPrimitives.WriteUInt32LittleEndian(init.AsSpan(4), 31);
        BinaryPrimitives.WriteUInt32LittleEndian(init.AsSpan(8), 128 << 10);
        var reply = Fuse(requests, 1, interrupts, backend, FuseInit, 0, init, 256);
        Assert.Equal(7u, BinaryPrimitives.ReadUInt32LittleEndian(reply.AsSpan(OutHeaderSize)));           // major
        Assert.InRange(BinaryPrimitives.ReadUInt32LittleEndian(reply.AsSpan(OutHeaderSize + 4)), 27u, 99u); // minor

        // FUSE_LOOKUP of the host file under the root (node 1): fuse_entry_out then fuse_attr (size at +8).
        reply = Fuse(requests, 2, interrupts, backend, FuseLookup, 1, Encoding.UTF8.GetBytes("hello.txt\0"), 256);
        ulong node = BinaryPrimitives.ReadUInt64LittleEndian(reply.AsSpan(OutHeaderSize));
        Assert.NotEqual(0UL, node);
        Assert.Equal((ulong)text.Length, BinaryPrimitives.ReadUInt64LittleEndian(reply.AsSpan(OutHeaderSize + 40 + 8)));

        // FUSE_OPEN (O_RDONLY) and FUSE_READ: the file's bytes arrive in guest memory.
        reply = Fuse(requests, 3, interrupts, backend, FuseOpen, node, new byte[8], 64);
        ulong fh = BinaryPrimitives.ReadUInt64LittleEndian(reply.AsSpan(OutHeaderSize));
        var readIn = new byte[40];
        BinaryPrimitives.WriteUInt64LittleEndian(readIn, fh);
        BinaryPrimitives.WriteUInt32LittleEndian(readIn.AsSpan(16), 4096);
        reply = Fuse(requests, 4, interrupts, backend, FuseRead, node, readIn, OutHeaderSize + 4096);
        Assert.Equal(text, Encoding.UTF8.GetString(reply.AsSpan(OutHeaderSize)));
        Assert.True(interrupts.QueueInterrupts >= 1, "no interrupt for the completions");

        device.Deactivate();
        Assert.Null(device.Failure);
    }
}
