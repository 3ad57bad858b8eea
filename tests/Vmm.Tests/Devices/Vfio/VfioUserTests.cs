using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.User;
using Vmm.Interop;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Interop.VfioConstants;
using static Vmm.Interop.VfioUser;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>VfioUserClient against the vfio-user test GPU (a real server process, docs/test-gpu.md), and against a
/// fake in-process server that misbehaves. No KVM needed: "guest RAM" is a memfd-backed GuestMemory.</summary>
public sealed class VfioUserTests : IDisposable
{
    private const uint RegId = 0x00, RegScratch = 0x08, RegBar2SizeLo = 0x10, RegBar2SizeHi = 0x14, RegDmaSrcLo = 0x20, RegDmaSrcHi = 0x24,
        RegDmaDstLo = 0x28, RegDmaDstHi = 0x2C, RegDmaLen = 0x30, RegDmaPattern = 0x34, RegDmaVector = 0x38, RegDmaCmd = 0x3C,
        RegDmaStatus = 0x40, RegDmaCount = 0x44, RegIrqCount = 0x48, RegIrqAck = 0x4C;
    private const uint CmdFill = 1, CmdCopy = 2, CmdCopyFromBar2 = 3;
    private const ulong RamBase = 0x10_0000, RamSize = 4 << 20;
    private const ulong Bar2Size = 8UL << 30;

    private readonly TestGpuServer _server = TestGpuServer.Start();
    private readonly List<IDisposable> _cleanup = [];

    public void Dispose()
    {
        for (int i = _cleanup.Count - 1; i >= 0; i--)
            _cleanup[i].Dispose();
        _server.Dispose();
    }

    private VfioUserClient Connect(VfioUserClientOptions? options = null)
    {
        var client = VfioUserClient.Connect(_server.SocketPath, options);
        _cleanup.Add(client);
        return client;
    }

    private GuestMemory Ram()
    {
        var ram = GuestMemory.Create([(new GuestAddress(RamBase), RamSize)]);
        _cleanup.Add(ram);
        return ram;
    }

    private static void MapRam(IVfioDevice device, GuestMemory ram, bool byFd = true)
    {
        foreach (var r in ram.Regions)
            device.Dma.Map(r.Start.Value, r.Size, r.HostAddress, byFd ? ram.MemFd : -1, r.FileOffset, writable: true);
    }

    private static uint Reg(IVfioDevice d, uint offset)
    {
        Span<byte> b = stackalloc byte[4];
        d.ReadRegion(0, offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static void SetReg(IVfioDevice d, uint offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        d.WriteRegion(0, offset, b);
    }

    private static ushort Config16(IVfioDevice d, int offset)
    {
        Span<byte> b = stackalloc byte[2];
        d.ReadRegion(VfioRegionIndex.Config, (ulong)offset, b);
        return BinaryPrimitives.ReadUInt16LittleEndian(b);
    }

    private static uint Config32(IVfioDevice d, int offset)
    {
        Span<byte> b = stackalloc byte[4];
        d.ReadRegion(VfioRegionIndex.Config, (ulong)offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static void SetConfig16(IVfioDevice d, int offset, ushort value)
    {
        Span<byte> b = stackalloc byte[2];
        BinaryPrimitives.WriteUInt16LittleEndian(b, value);
        d.WriteRegion(VfioRegionIndex.Config, (ulong)offset, b);
    }

    private static void EnableBusMaster(IVfioDevice d) => SetConfig16(d, 0x04, (ushort)(Config16(d, 0x04) | 0x6));

    private static uint RunDma(IVfioDevice d, uint command, ulong src, ulong dst, uint length, uint pattern = 0, uint vector = 0)
    {
        SetReg(d, RegDmaSrcLo, (uint)src);
        SetReg(d, RegDmaSrcHi, (uint)(src >> 32));
        SetReg(d, RegDmaDstLo, (uint)dst);
        SetReg(d, RegDmaDstHi, (uint)(dst >> 32));
        SetReg(d, RegDmaLen, length);
        SetReg(d, RegDmaPattern, pattern);
        SetReg(d, RegDmaVector, vector);
        SetReg(d, RegDmaCmd, command);
        return Reg(d, RegDmaStatus);
    }

    private static bool Signalled(EventFd e, int timeoutMs)
    {
        Span<bool> ready = stackalloc bool[1];
        EventFd.Poll([e.Fd], ready, timeoutMs);
        return ready[0] && e.TryRead(out _);
    }

    private static ulong Fnv(ulong h, ReadOnlySpan<byte> data)
    {
        foreach (byte b in data)
            h = (h ^ b) * 0x100000001b3;
        return h;
    }

    [Fact]
    public void Device_region_and_irq_info_match_the_test_gpu_spec()
    {
        var d = Connect();
        Assert.True(d.IsPci);
        Assert.True(d.CanReset);
        Assert.Equal(9, d.RegionCount);
        Assert.Equal(5, d.IrqCount);
        Assert.Equal("vfio-user " + _server.SocketPath, d.Name);

        var bar0 = d.GetRegionInfo(0);
        Assert.Equal(16UL << 20, bar0.Size);
        Assert.Equal(VfioRegionFlags.Read | VfioRegionFlags.Write | VfioRegionFlags.Mmap | VfioRegionFlags.Caps, bar0.Flags);
        Assert.Equal([new VfioMmapArea(0x10000, (16UL << 20) - 0x10000)], bar0.MmapAreas);

        var bar2 = d.GetRegionInfo(2);
        Assert.Equal(Bar2Size, bar2.Size);
        Assert.True(bar2.Size >= 4UL << 30);
        Assert.Equal([new VfioMmapArea(0, Bar2Size)], bar2.MmapAreas);

        var rom = d.GetRegionInfo(VfioRegionIndex.Rom);
        Assert.Equal((64UL << 10, VfioRegionFlags.Read), (rom.Size, rom.Flags));
        Assert.Empty(rom.MmapAreas);
        var config = d.GetRegionInfo(VfioRegionIndex.Config);
        Assert.Equal((4096UL, VfioRegionFlags.Read | VfioRegionFlags.Write), (config.Size, config.Flags));
        foreach (int empty in new[] { 1, 3, 4, 5, 8 })
            Assert.Equal(0UL, d.GetRegionInfo(empty).Size);

        Assert.Equal(new VfioIrqInfo(VfioIrqIndex.Intx, VfioIrqFlags.EventFd | VfioIrqFlags.Maskable | VfioIrqFlags.Automasked, 1), d.GetIrqInfo(VfioIrqIndex.Intx));
        Assert.Equal(new VfioIrqInfo(VfioIrqIndex.Msi, VfioIrqFlags.EventFd | VfioIrqFlags.NoResize, 1), d.GetIrqInfo(VfioIrqIndex.Msi));
        Assert.Equal(new VfioIrqInfo(VfioIrqIndex.Msix, VfioIrqFlags.EventFd | VfioIrqFlags.NoResize, 8), d.GetIrqInfo(VfioIrqIndex.Msix));
        Assert.Equal(0U, d.GetIrqInfo(VfioIrqIndex.Err).Count);
        Assert.Equal(0U, d.GetIrqInfo(VfioIrqIndex.Req).Count);
    }

    [Fact]
    public void Config_space_has_the_identity_bar_types_and_capability_chain()
    {
        var d = Connect();
        Assert.Equal(0x1B36, Config16(d, 0x00));
        Assert.Equal(0x7001, Config16(d, 0x02));
        Assert.Equal(0x0302_0001U, Config32(d, 0x08)); // class 03, subclass 02, prog-if 0, revision 1
        Assert.Equal(0x7001_1B36U, Config32(d, 0x2C));
        Assert.Equal(0x10, Config16(d, 0x06) & 0x10);
        Assert.Equal(0x0U, Config32(d, 0x10) & 0xF); // 32-bit, non-prefetchable memory
        Assert.Equal(0xCU, Config32(d, 0x18) & 0xF); // 64-bit, prefetchable memory
        Assert.Equal(1, Config16(d, 0x3C) >> 8); // INTA

        // BAR sizing: all ones reads back the size mask and the type bits.
        Span<byte> ones = [0xFF, 0xFF, 0xFF, 0xFF];
        d.WriteRegion(VfioRegionIndex.Config, 0x10, ones);
        Assert.Equal(0xFF00_0000U, Config32(d, 0x10));
        d.WriteRegion(VfioRegionIndex.Config, 0x18, ones);
        d.WriteRegion(VfioRegionIndex.Config, 0x1C, ones);
        Assert.Equal(0x0000_000CU, Config32(d, 0x18));
        Assert.Equal(0xFFFF_FFFEU, Config32(d, 0x1C)); // 8 GiB

        var chain = new List<(int Offset, int Id)>();
        for (int at = Config16(d, 0x34) & 0xFF; at != 0 && chain.Count < 16; at = Config16(d, at) >> 8)
            chain.Add((at, Config16(d, at) & 0xFF));
        Assert.Equal([0x01, 0x05, 0x10, 0x11, 0x09], chain.Select(c => c.Id));
        Assert.Equal(0x40, chain[0].Offset);

        int msi = chain[1].Offset, pcie = chain[2].Offset, msix = chain[3].Offset, vendor = chain[4].Offset;
        Assert.Equal(0x80, Config16(d, msi + 2) & 0x180); // 64-bit, no per-vector masking
        Assert.Equal(0, (Config16(d, pcie + 2) >> 4) & 0xF); // endpoint
        Assert.Equal(2, Config16(d, pcie + 2) & 0xF);
        Assert.Equal(7, Config16(d, msix + 2) & 0x7FF);
        Assert.Equal(0x1000U, Config32(d, msix + 4));
        Assert.Equal(0x2000U, Config32(d, msix + 8));
        Span<byte> vendorCap = stackalloc byte[8];
        d.ReadRegion(VfioRegionIndex.Config, (ulong)vendor, vendorCap);
        Assert.Equal(8, vendorCap[2]);
        Assert.Equal("vGPU", System.Text.Encoding.ASCII.GetString(vendorCap[4..8]));
        Assert.Equal(0U, Config32(d, 0x100));

        Span<byte> rom = stackalloc byte[18];
        d.ReadRegion(VfioRegionIndex.Rom, 0, rom);
        Assert.Equal([0x55, 0xAA], rom[..2].ToArray());
        Assert.Equal("vmm test GPU ROM", System.Text.Encoding.ASCII.GetString(rom[2..]));
    }

    [Fact]
    public void Registers_read_the_id_and_bar2_size_and_scratch_round_trips()
    {
        var d = Connect();
        Assert.Equal(0x47505530U, Reg(d, RegId));
        Assert.Equal(Bar2Size, Reg(d, RegBar2SizeLo) | ((ulong)Reg(d, RegBar2SizeHi) << 32));
        SetReg(d, RegScratch, 0xA5A5_1234);
        Assert.Equal(0xA5A5_1234U, Reg(d, RegScratch));
        SetReg(d, RegScratch, 0x0BAD_F00D);
        Assert.Equal(0x0BAD_F00DU, Reg(d, RegScratch));
    }

    [Fact]
    public void A_server_error_reply_names_the_command_region_offset_and_errno()
    {
        var d = Connect();
        // Registers take dword writes only: a 2-byte write is refused by the server.
        var e = Assert.Throws<VfioException>(() => d.WriteRegion(0, 0x0A, [1, 2]));
        Assert.Contains("VFIO_USER_REGION_WRITE", e.Message);
        Assert.Contains("region 0 offset 0xa", e.Message);
        Assert.Contains("EINVAL", e.Message);
        Assert.Equal(Errno.EINVAL, e.Errno);
        // The connection stays usable after an error reply.
        Assert.Equal(0x47505530U, Reg(d, RegId));
    }

    [Fact]
    public void Bar2_written_through_its_mapping_at_both_ends_is_what_the_server_copies_and_hashes()
    {
        var d = Connect();
        var ram = Ram();
        MapRam(d, ram);
        EnableBusMaster(d);
        byte[] first = [.. Enumerable.Range(0, 4096).Select(i => (byte)(i * 7 + 1))];
        byte[] last = [.. Enumerable.Range(0, 4096).Select(i => (byte)(i * 13 + 5))];
        using (var low = d.MapRegion(2, 0, 4096))
        using (var high = d.MapRegion(2, Bar2Size - 4096, 4096))
        {
            Marshal.Copy(first, 0, low.HostAddress, 4096);
            Marshal.Copy(last, 0, high.HostAddress, 4096);
        }

        Assert.Equal(1U, RunDma(d, CmdCopyFromBar2, 0, RamBase, 4096));
        Assert.Equal(first, ram.GetSpan(new GuestAddress(RamBase), 4096).ToArray());
        Assert.Equal(1U, RunDma(d, CmdCopyFromBar2, Bar2Size - 4096, RamBase + 0x10000, 4096));
        Assert.Equal(last, ram.GetSpan(new GuestAddress(RamBase + 0x10000), 4096).ToArray());

        // REGION_READ sees the same memory as the mapping.
        var viaMessages = new byte[4096];
        d.ReadRegion(2, Bar2Size - 4096, viaMessages);
        Assert.Equal(last, viaMessages);

        d.Dispose();
        var report = _server.WaitForReport();
        var window = new byte[64 << 10];
        first.CopyTo(window, 0);
        ulong h = Fnv(0xcbf29ce484222325, window);
        Array.Clear(window);
        last.CopyTo(window, window.Length - 4096);
        h = Fnv(h, window);
        Assert.Equal(h.ToString("x16"), report["bar2_fnv"]);
        Assert.Equal("2", report["dma_ops"]);
        Assert.Equal("0", report["errors"]);
    }

    [Fact]
    public void Bar0_sram_is_mmappable_behind_the_trapped_registers()
    {
        var d = Connect();
        using (var sram = d.MapRegion(0, 0x10000, 0x2000))
            Marshal.WriteInt64(sram.HostAddress, 0x1000, 0x1122_3344_5566_7788);
        Span<byte> b = stackalloc byte[8];
        d.ReadRegion(0, 0x11000, b);
        Assert.Equal(0x1122_3344_5566_7788UL, BinaryPrimitives.ReadUInt64LittleEndian(b));
        var e = Assert.Throws<VfioException>(() => d.MapRegion(0, 0, 4096));
        Assert.Contains("not inside one of its mmappable areas", e.Message);
    }

    [Fact]
    public void Dma_fill_and_copy_land_in_guest_memory_and_signal_the_msix_vector()
    {
        var d = Connect();
        var ram = Ram();
        MapRam(d, ram);
        EnableBusMaster(d);
        using var vector3 = new EventFd();
        using var vector5 = new EventFd();
        // Vectors 0-2, 4, 6, 7 stay detached (-1): the client splits that into runs.
        d.SetIrqEventFds(VfioIrqIndex.Msix, 0, [-1, -1, -1, vector3.Fd, -1, vector5.Fd, -1, -1]);

        Assert.Equal(1U, RunDma(d, CmdFill, 0, RamBase + 0x1000, 64 << 10, pattern: 0xDEAD_BEEF, vector: 3));
        var filled = ram.GetSpan(new GuestAddress(RamBase + 0x1000), 64 << 10);
        for (int i = 0; i < filled.Length; i += 4)
            Assert.Equal(0xDEAD_BEEFU, BinaryPrimitives.ReadUInt32LittleEndian(filled[i..]));
        Assert.Equal(0U, BinaryPrimitives.ReadUInt32LittleEndian(ram.GetSpan(new GuestAddress(RamBase + 0x1000 + (64 << 10)), 4)));
        Assert.True(Signalled(vector3, 5000), "MSI-X vector 3 was not signalled after FILL");
        Assert.False(Signalled(vector5, 0));

        byte[] source = [.. Enumerable.Range(0, 8192).Select(i => (byte)(i ^ (i >> 8)))];
        ram.Write(new GuestAddress(RamBase + 0x20_0000), source);
        Assert.Equal(1U, RunDma(d, CmdCopy, RamBase + 0x20_0000, RamBase + 0x30_0000, 8192, vector: 5));
        Assert.Equal(source, ram.GetSpan(new GuestAddress(RamBase + 0x30_0000), 8192).ToArray());
        Assert.True(Signalled(vector5, 5000), "MSI-X vector 5 was not signalled after COPY");
        Assert.Equal(2U, Reg(d, RegDmaCount));
        Assert.Equal(2U, Reg(d, RegIrqCount));
    }

    [Fact]
    public void Dma_outside_the_mapped_ranges_or_malformed_sets_an_error_status()
    {
        var d = Connect();
        var ram = Ram();
        MapRam(d, ram);
        Assert.Equal(0x8000_0004U, RunDma(d, CmdFill, 0, RamBase, 4096)); // bus master still off
        EnableBusMaster(d);
        Assert.Equal(0x8000_0001U, RunDma(d, CmdFill, 0, 0x4000_0000, 4096)); // not mapped
        Assert.Equal(0x8000_0001U, RunDma(d, CmdFill, 0, RamBase + RamSize - 4096, 8192)); // runs past the map
        Assert.Equal(0x8000_0001U, RunDma(d, CmdCopyFromBar2, Bar2Size - 4096, RamBase, 8192)); // past BAR2
        Assert.Equal(0x8000_0002U, RunDma(d, CmdFill, 0, RamBase, 6)); // not a multiple of 4
        Assert.Equal(0x8000_0003U, RunDma(d, 9, 0, RamBase, 4096));
        Assert.Equal(0U, Reg(d, RegDmaCount));
        Assert.True(ram.GetSpan(new GuestAddress(RamBase), 4096).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public void Without_an_fd_the_server_reaches_guest_memory_through_dma_read_and_write_messages()
    {
        var ram = Ram();
        var d = Connect(new VfioUserClientOptions { DmaMemory = ram });
        MapRam(d, ram, byFd: false);
        EnableBusMaster(d);
        // 3 MiB crosses several max_data_xfer_size (1 MiB) messages.
        Assert.Equal(1U, RunDma(d, CmdFill, 0, RamBase, 3 << 20, pattern: 0x0102_0304));
        Assert.Equal(0x0102_0304U, BinaryPrimitives.ReadUInt32LittleEndian(ram.GetSpan(new GuestAddress(RamBase + (3 << 20) - 4), 4)));
        Assert.Equal(1U, RunDma(d, CmdCopy, RamBase, RamBase + (3 << 20), 4096));
        Assert.Equal(0x0102_0304U, BinaryPrimitives.ReadUInt32LittleEndian(ram.GetSpan(new GuestAddress(RamBase + (3 << 20)), 4)));

        // Unmapped again: the server's DMA now fails, and the client refuses DMA outside its maps.
        foreach (var r in ram.Regions)
            d.Dma.Unmap(r.Start.Value, r.Size);
        Assert.Equal(0x8000_0001U, RunDma(d, CmdFill, 0, RamBase, 4096));
    }

    [Fact]
    public void Intx_is_level_triggered_and_automasked_until_the_unmask_eventfd()
    {
        var d = Connect();
        var ram = Ram();
        MapRam(d, ram);
        EnableBusMaster(d);
        using var trigger = new EventFd();
        using var unmask = new EventFd();
        d.SetIrqEventFds(VfioIrqIndex.Intx, 0, [trigger.Fd]);
        d.SetIntxUnmaskEventFd(unmask.Fd);

        Assert.Equal(1U, RunDma(d, CmdFill, 0, RamBase, 4096));
        Assert.True(Signalled(trigger, 5000), "INTx was not signalled");
        Assert.Equal(0x08, Config16(d, 0x06) & 0x08); // interrupt status
        // Masked after the trigger: the line stays asserted, the unmask (guest EOI) re-signals it.
        unmask.Signal();
        Assert.True(Signalled(trigger, 5000), "INTx was not re-signalled at unmask while still asserted");
        SetReg(d, RegIrqAck, 1);
        Assert.Equal(0, Config16(d, 0x06) & 0x08);
        unmask.Signal();
        Assert.False(Signalled(trigger, 300));

        // INTx disable in the command register silences it.
        SetConfig16(d, 0x04, (ushort)(Config16(d, 0x04) | 0x400));
        Assert.Equal(1U, RunDma(d, CmdFill, 0, RamBase, 4096));
        Assert.False(Signalled(trigger, 300));
    }

    [Fact]
    public void Reset_restores_registers_and_config()
    {
        var d = Connect();
        SetReg(d, RegScratch, 77);
        EnableBusMaster(d);
        d.Reset();
        Assert.Equal(0U, Reg(d, RegScratch));
        Assert.Equal(0, Config16(d, 0x04));
    }

    [Fact]
    public void A_server_killed_mid_session_gives_a_VfioException_not_a_hang()
    {
        var d = Connect();
        Assert.Equal(0x47505530U, Reg(d, RegId));
        _server.Process.Kill();
        _server.Process.WaitForExit();
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<VfioException>(() => Reg(d, RegId));
        Assert.Contains($"vfio-user server at {_server.SocketPath} closed the connection", e.Message);
        // Every later call fails the same way, immediately.
        var again = Assert.Throws<VfioException>(() => SetReg(d, RegScratch, 1));
        Assert.Contains("closed the connection", again.Message);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"took {clock.Elapsed}");
    }

    [Fact]
    public void The_server_refuses_bad_commands_with_error_replies_and_keeps_serving()
    {
        using var socket = UnixSocket.Connect(_server.SocketPath);
        socket.SetReceiveTimeout(TimeSpan.FromSeconds(10));
        using var channel = new VfioUserChannel(socket, 1 << 20);
        (uint Flags, uint Errno) Ask(ushort command, byte[] payload)
        {
            channel.Send(1, command, 0, 0, payload);
            var reply = channel.Receive(false)!;
            reply.CloseFds();
            return (reply.Header.flags, reply.Header.error_no);
        }
        uint error = VFIO_USER_F_TYPE_REPLY | VFIO_USER_F_ERROR;
        Assert.Equal((error, (uint)Errno.EINVAL), Ask((ushort)VfioUserCommand.RegionRead, [1, 2, 3])); // short payload
        Assert.Equal((error, (uint)Errno.EINVAL), Ask((ushort)VfioUserCommand.RegionRead,
            ToBytes(new vfio_user_region_access { offset = ulong.MaxValue - 2, region = 2, count = 8 }))); // wraps
        Assert.Equal((error, (uint)Errno.EINVAL), Ask((ushort)VfioUserCommand.DeviceGetRegionInfo, ToBytes(new vfio_region_info { argsz = 32, index = 99 })));
        Assert.Equal((error, (uint)Errno.EINVAL), Ask((ushort)VfioUserCommand.DeviceSetIrqs,
            ToBytes(new vfio_irq_set { argsz = 20, flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, index = 2, start = 6, count = 4 })));
        Assert.Equal((error, (uint)Errno.EOPNOTSUPP), Ask(200, []));
        // An oversized message is drained and refused; the stream stays in sync.
        Assert.Equal((error, (uint)Errno.E2BIG), Ask((ushort)VfioUserCommand.RegionWrite, new byte[3 << 20]));
        Assert.Equal(VFIO_USER_F_TYPE_REPLY, Ask((ushort)VfioUserCommand.DeviceGetInfo, ToBytes(new vfio_user_device_info { argsz = 16 })).Flags);
        socket.Shutdown();
        Assert.Equal("6", _server.WaitForReport()["errors"]);
    }

    // ---- a fake server that misbehaves ----

    public enum Misbehaviour
    {
        HeaderShorterThanItself,
        HugeMessageSize,
        WrongReplyId,
        BadVersionJson,
        ClosesAfterRequest,
        NeverAnswers,
        AbsurdRegionCount,
        SparseAreaOutsideRegion,
        TruncatedRegionInfo,
        MmapRegionWithoutFd,
    }

    [Theory]
    [InlineData(Misbehaviour.HeaderShorterThanItself, "less than its 16-byte header")]
    [InlineData(Misbehaviour.HugeMessageSize, "more than the")]
    [InlineData(Misbehaviour.WrongReplyId, "with id 4660")]
    [InlineData(Misbehaviour.BadVersionJson, "bad capabilities JSON")]
    [InlineData(Misbehaviour.ClosesAfterRequest, "closed the connection")]
    [InlineData(Misbehaviour.NeverAnswers, "did not answer VFIO_USER_DEVICE_GET_INFO")]
    [InlineData(Misbehaviour.AbsurdRegionCount, "claims 100000 regions")]
    [InlineData(Misbehaviour.SparseAreaOutsideRegion, "is outside the 0x10000-byte region")]
    [InlineData(Misbehaviour.TruncatedRegionInfo, "is malformed")]
    [InlineData(Misbehaviour.MmapRegionWithoutFd, "sent no file descriptor")]
    public void A_misbehaving_server_gives_a_VfioException(Misbehaviour misbehaviour, string expected)
    {
        string dir = Directory.CreateTempSubdirectory("vfio-user-fake-").FullName;
        string path = Path.Combine(dir, "fake.sock");
        using var listener = UnixSocket.Listen(path);
        var fake = new Thread(() => RunFakeServer(listener, misbehaviour)) { IsBackground = true, Name = "fake vfio-user server" };
        fake.Start();
        try
        {
            var clock = Stopwatch.StartNew();
            var e = Assert.Throws<VfioException>(() => VfioUserClient.Connect(path, new VfioUserClientOptions { ReplyTimeout = TimeSpan.FromMilliseconds(500) }).Dispose());
            Assert.Contains(expected, e.Message);
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"took {clock.Elapsed}");
        }
        finally
        {
            Assert.True(fake.Join(TimeSpan.FromSeconds(10)), "the fake server did not finish");
            Directory.Delete(dir, recursive: true);
        }
    }

    private static void RunFakeServer(UnixSocket listener, Misbehaviour misbehaviour)
    {
        using var socket = listener.Accept();
        socket.SetReceiveTimeout(TimeSpan.FromSeconds(5));
        using var channel = new VfioUserChannel(socket, 1 << 20);
        try
        {
            while (channel.Receive(false) is { } m)
            {
                m.CloseFds();
                var h = m.Header;
                switch ((VfioUserCommand)h.cmd, misbehaviour)
                {
                    case (VfioUserCommand.Version, Misbehaviour.BadVersionJson):
                        channel.Reply(h, [0, 0, 1, 0, .. "{\"capabilities\": [1,"u8, 0]);
                        break;
                    case (VfioUserCommand.Version, _):
                        channel.Reply(h, VersionPayload(1, 1 << 20));
                        break;
                    case (VfioUserCommand.DeviceGetInfo, Misbehaviour.HeaderShorterThanItself):
                        socket.Send(ToBytes(new vfio_user_header { msg_id = h.msg_id, cmd = h.cmd, msg_size = 8, flags = 1 }));
                        return;
                    case (VfioUserCommand.DeviceGetInfo, Misbehaviour.HugeMessageSize):
                        socket.Send(ToBytes(new vfio_user_header { msg_id = h.msg_id, cmd = h.cmd, msg_size = 0x7FFF_FFFF, flags = 1 }));
                        return;
                    case (VfioUserCommand.DeviceGetInfo, Misbehaviour.WrongReplyId):
                        channel.Send(0x1234, h.cmd, VFIO_USER_F_TYPE_REPLY, 0, ToBytes(new vfio_user_device_info { argsz = 16 }));
                        break;
                    case (VfioUserCommand.DeviceGetInfo, Misbehaviour.ClosesAfterRequest):
                        return;
                    case (VfioUserCommand.DeviceGetInfo, Misbehaviour.NeverAnswers):
                        Thread.Sleep(1000);
                        return;
                    case (VfioUserCommand.DeviceGetInfo, Misbehaviour.AbsurdRegionCount):
                        channel.Reply(h, ToBytes(new vfio_user_device_info { argsz = 16, flags = 2, num_regions = 100000 }));
                        break;
                    case (VfioUserCommand.DeviceGetInfo, _):
                        channel.Reply(h, ToBytes(new vfio_user_device_info { argsz = 16, flags = 2, num_regions = 1 }));
                        break;
                    case (VfioUserCommand.DeviceGetRegionInfo, Misbehaviour.TruncatedRegionInfo):
                        channel.Reply(h, new byte[20]);
                        break;
                    case (VfioUserCommand.DeviceGetRegionInfo, Misbehaviour.MmapRegionWithoutFd):
                        channel.Reply(h, ToBytes(new vfio_region_info { argsz = 32, flags = 7, size = 0x10000 }));
                        break;
                    case (VfioUserCommand.DeviceGetRegionInfo, _):
                    {
                        var reply = new byte[64];
                        Write(reply, new vfio_region_info { argsz = 64, flags = 0xF, cap_offset = 32, size = 0x10000 });
                        Write(reply.AsSpan(32), new vfio_region_info_cap_sparse_mmap { header = new vfio_info_cap_header { id = 1, version = 1 }, nr_areas = 1 });
                        Write(reply.AsSpan(48), new vfio_region_sparse_mmap_area { offset = 0x8000, size = 0x10000 });
                        using var memfd = new EventFd(); // any fd will do: the client fails before it mmaps
                        channel.Reply(h, reply, [memfd.Fd]);
                        break;
                    }
                    default:
                        channel.ReplyError(h, Errno.EOPNOTSUPP);
                        break;
                }
            }
        }
        catch (SyscallException)
        {
            // The client hung up first: that is what the test expects.
        }
    }
}
