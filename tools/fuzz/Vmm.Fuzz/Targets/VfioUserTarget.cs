using System.Buffers.Binary;
using Vmm.Devices.Vfio;
using Vmm.Devices.Vfio.User;
using Vmm.Interop;
using Vmm.Memory;
using static Vmm.Interop.VfioUser;

namespace Vmm.Fuzz;

/// <summary>The vfio-user client against a server whose every message is the input's: a fake server thread answers
/// each request the client sends with the input's next record, then closes. The client connects (VERSION,
/// DEVICE_GET_INFO, region and IRQ info), maps 1 MiB of guest RAM for DMA, and, if all that worked, reads and
/// writes every region, sets MSI-X eventfds, resets the device. Records: [mode: bit 0 raw (the bytes are the whole
/// message, e.g. a server-initiated DMA request), bit 1 an error reply, bit 2 a memfd rides along] [length u16]
/// [bytes]; a non-raw record is a reply header matching the request (id, command, size) plus the bytes as payload.
/// Invariants: every server misbehaviour is a <see cref="VfioException"/> naming it; nothing else escapes; no
/// reply makes the client allocate or map without bound, or wait past its reply timeout (1 s here).</summary>
public sealed class VfioUserTarget : IFuzzTarget
{
    private readonly string _path = Path.Combine(Path.GetTempPath(), $"vmm-fuzz-vfio-user-{Environment.ProcessId}.sock");
    private readonly UnixSocket _listener;
    private readonly GuestMemory _memory = GuestMemory.Create(1 << 20);
    private readonly int _memfd;

    public VfioUserTarget()
    {
        File.Delete(_path);
        _listener = UnixSocket.Listen(_path);
        _memfd = Sys.MemfdCreate("vmm-fuzz-bar");
        Sys.Ftruncate(_memfd, 1 << 20, "fuzz BAR memfd");
    }

    public void Run(ReadOnlySpan<byte> input)
    {
        var records = new List<(byte Mode, byte[] Bytes)>();
        var r = new FuzzReader(input);
        while (!r.AtEnd && records.Count < 256)
        {
            byte mode = r.U8();
            int length = r.U16();
            records.Add((mode, r.Bytes(length).ToArray()));
        }
        Exception? serverError = null;
        var server = new Thread(() =>
        {
            try
            {
                Serve(records);
            }
            catch (Exception e)
            {
                serverError = e;
            }
        }) { Name = "fuzz-vfio-user-server" };
        server.Start();
        try
        {
            Drive();
        }
        finally
        {
            server.Join();
        }
        if (serverError is not null)
            throw new FuzzInvariantException("the fake server failed (a harness bug): " + serverError.Message, serverError);
    }

    private void Drive()
    {
        VfioUserClient client;
        try
        {
            client = VfioUserClient.Connect(_path, new VfioUserClientOptions { ReplyTimeout = TimeSpan.FromSeconds(1), DmaMemory = _memory });
        }
        catch (VfioException e)
        {
            FuzzTargets.Explain("connect: " + e.Message);
            return;
        }
        using (client)
        {
            try
            {
                var ram = _memory.Regions[0];
                client.Dma.Map(0, ram.Size, ram.HostAddress, _memory.MemFd, ram.FileOffset, writable: true);
                Span<byte> data = stackalloc byte[8];
                for (int i = 0; i < client.RegionCount; i++)
                {
                    var info = client.GetRegionInfo(i);
                    if (info.Size >= 8 && info.Readable)
                        client.ReadRegion(i, info.Size - 8, data);
                    if (info.Size >= 4 && info.Writable)
                        client.WriteRegion(i, 0, data[..4]);
                    foreach (var area in info.MmapAreas)
                    {
                        if (area.Size <= 1 << 20)
                            client.MapRegion(i, area.Offset, area.Size).Dispose();
                    }
                }
                if (client.IrqCount > (int)VfioIrqIndex.Msix && client.GetIrqInfo(VfioIrqIndex.Msix).Count > 0)
                {
                    using var e = new EventFd();
                    client.SetIrqEventFds(VfioIrqIndex.Msix, 0, [e.Fd]);
                    client.DisableIrqs(VfioIrqIndex.Msix);
                }
                if (client.CanReset)
                    client.Reset();
                client.Dma.Unmap(0, ram.Size);
            }
            catch (VfioException e)
            {
                // The documented answer to a server that breaks the protocol.
                FuzzTargets.Explain(e.Message);
            }
        }
    }

    private void Serve(List<(byte Mode, byte[] Bytes)> records)
    {
        using var conn = _listener.Accept();
        // A client that waits for the rest of a message sends nothing: then the next record goes out anyway.
        conn.SetReceiveTimeout(TimeSpan.FromMilliseconds(50));
        var fds = new List<int>();
        Span<byte> h = stackalloc byte[HeaderSize];
        Span<byte> reply = stackalloc byte[HeaderSize];
        ushort id = 0, command = 0;
        foreach (var (mode, bytes) in records)
        {
            try
            {
                if (!conn.ReceiveExactly(h, fds))
                    return;
                id = BinaryPrimitives.ReadUInt16LittleEndian(h);
                command = BinaryPrimitives.ReadUInt16LittleEndian(h[2..]);
                uint size = BinaryPrimitives.ReadUInt32LittleEndian(h[4..]);
                if (size > HeaderSize && !conn.Discard(size - HeaderSize))
                    return;
            }
            catch (SyscallException)
            {
                // Timeout (the client waits for us) or a half message: answer with the next record anyway.
            }
            foreach (int fd in fds)
                Sys.Close(fd);
            fds.Clear();
            ReadOnlySpan<int> pass = (mode & 4) != 0 ? [_memfd] : [];
            try
            {
                if ((mode & 1) != 0)
                {
                    if (bytes.Length > 0)
                        conn.Send(bytes, pass);
                    continue;
                }
                BinaryPrimitives.WriteUInt16LittleEndian(reply, id);
                BinaryPrimitives.WriteUInt16LittleEndian(reply[2..], command);
                BinaryPrimitives.WriteUInt32LittleEndian(reply[4..], (uint)(HeaderSize + bytes.Length));
                BinaryPrimitives.WriteUInt32LittleEndian(reply[8..], VFIO_USER_F_TYPE_REPLY | ((mode & 2) != 0 ? VFIO_USER_F_ERROR : 0));
                BinaryPrimitives.WriteUInt32LittleEndian(reply[12..], (mode & 2) != 0 ? 5u : 0u); // EIO
                conn.Send(reply, bytes, default, pass);
            }
            catch (SyscallException)
            {
                return; // the client gave up on us (EPIPE)
            }
        }
    }

    public void Dispose()
    {
        _listener.Dispose();
        Sys.Close(_memfd);
        _memory.Dispose();
        File.Delete(_path);
    }
}
