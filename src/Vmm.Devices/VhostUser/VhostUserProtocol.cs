using System.Buffers.Binary;

namespace Vmm.Devices.VhostUser;

/// <summary>vhost-user front-end requests (QEMU docs/interop/vhost-user.rst, "Front-end message types").</summary>
public enum VhostUserRequest : uint
{
    GetFeatures = 1,
    SetFeatures = 2,
    SetOwner = 3,
    ResetOwner = 4,
    SetMemTable = 5,
    SetLogBase = 6,
    SetLogFd = 7,
    SetVringNum = 8,
    SetVringAddr = 9,
    SetVringBase = 10,
    GetVringBase = 11,
    SetVringKick = 12,
    SetVringCall = 13,
    SetVringErr = 14,
    GetProtocolFeatures = 15,
    SetProtocolFeatures = 16,
    GetQueueNum = 17,
    SetVringEnable = 18,
    GetConfig = 24,
    SetConfig = 25,
    ResetDevice = 34,
}

/// <summary>One guest RAM region as SET_MEM_TABLE describes it: where the guest sees it, how big, where the front-end
/// has it mapped (the address space the vring addresses are given in), and its offset in the fd sent with it.</summary>
public readonly record struct VhostUserMemoryRegion(ulong GuestPhysAddr, ulong MemorySize, ulong UserspaceAddr, ulong MmapOffset);

/// <summary>The wire format: a 12-byte header (request u32, flags u32, payload size u32, all little-endian) and
/// the payloads the front-end uses. Shared by the front-end and the fake back-ends of the tests.</summary>
public static class VhostUserProtocol
{
    public const int HeaderSize = 12;

    /// <summary>Header flags: bits 0-1 the version (always 1), bit 2 a reply, bit 3 "reply wanted" (REPLY_ACK).</summary>
    public const uint FlagVersion = 0x1, VersionMask = 0x3, FlagReply = 0x4, FlagNeedReply = 0x8;

    /// <summary>Virtio feature bit 30 in GET/SET_FEATURES: the back-end speaks the protocol-feature extension.</summary>
    public const int FeatureProtocolFeatures = 30;

    /// <summary>Protocol feature bits (GET/SET_PROTOCOL_FEATURES).</summary>
    public const int ProtocolMq = 0, ProtocolReplyAck = 3, ProtocolConfig = 9, ProtocolResetDevice = 13;

    /// <summary>SET_VRING_KICK/CALL/ERR payload: bits 0-7 the ring index, bit 8 "no fd follows" (polling mode).</summary>
    public const ulong VringIndexMask = 0xFF, VringNoFd = 0x100;

    /// <summary>SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS).</summary>
    public const int MaxMemoryRegions = 8;

    /// <summary>GET/SET_CONFIG carry at most 256 bytes of device configuration (VHOST_USER_MAX_CONFIG_SIZE).</summary>
    public const int MaxConfigSize = 256;

    /// <summary>The largest payload either side sends; a header announcing more is a protocol error.</summary>
    public const int MaxPayload = 4096;

    public const int U64Size = 8, VringStateSize = 8, VringAddrSize = 40, ConfigHeaderSize = 12, MemoryRegionSize = 32;

    private static readonly string[] s_names = BuildNames();

    /// <summary>The request's name as the spec writes it, e.g. <c>VHOST_USER_GET_VRING_BASE</c>.</summary>
    public static string Name(VhostUserRequest request) =>
        (uint)request < (uint)s_names.Length && s_names[(int)request] is { Length: > 0 } name ? name : $"vhost-user request {(uint)request}";

    private static string[] BuildNames()
    {
        var names = new string[64];
        foreach (var r in Enum.GetValues<VhostUserRequest>())
        {
            var sb = new System.Text.StringBuilder("VHOST_USER_");
            string pascal = r.ToString();
            for (int i = 0; i < pascal.Length; i++)
            {
                if (i > 0 && char.IsUpper(pascal[i]))
                    sb.Append('_');
                sb.Append(char.ToUpperInvariant(pascal[i]));
            }
            names[(int)r] = sb.ToString();
        }
        return names;
    }

    public static void WriteHeader(Span<byte> header, VhostUserRequest request, uint flags, int size)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(header, (uint)request);
        BinaryPrimitives.WriteUInt32LittleEndian(header[4..], flags);
        BinaryPrimitives.WriteUInt32LittleEndian(header[8..], (uint)size);
    }

    public static (VhostUserRequest Request, uint Flags, uint Size) ReadHeader(ReadOnlySpan<byte> header) =>
        ((VhostUserRequest)BinaryPrimitives.ReadUInt32LittleEndian(header), BinaryPrimitives.ReadUInt32LittleEndian(header[4..]),
            BinaryPrimitives.ReadUInt32LittleEndian(header[8..]));

    public static byte[] U64(ulong value)
    {
        var p = new byte[U64Size];
        BinaryPrimitives.WriteUInt64LittleEndian(p, value);
        return p;
    }

    /// <summary>struct vhost_vring_state: index u32, num u32.</summary>
    public static byte[] VringState(uint index, uint num)
    {
        var p = new byte[VringStateSize];
        BinaryPrimitives.WriteUInt32LittleEndian(p, index);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(4), num);
        return p;
    }

    /// <summary>struct vhost_vring_addr: index u32, flags u32, then the descriptor table, used ring, available ring
    /// (front-end virtual addresses) and the log address (guest-physical, unused without VHOST_VRING_F_LOG).</summary>
    public static byte[] VringAddr(uint index, uint flags, ulong descriptor, ulong used, ulong available, ulong log)
    {
        var p = new byte[VringAddrSize];
        BinaryPrimitives.WriteUInt32LittleEndian(p, index);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(4), flags);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(8), descriptor);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(16), used);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(24), available);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(32), log);
        return p;
    }

    /// <summary>The memory table: nregions u32, padding u32, then per region guest_phys_addr, memory_size,
    /// userspace_addr, mmap_offset (u64 each). One fd per region travels with it.</summary>
    public static byte[] MemoryTable(IReadOnlyList<VhostUserMemoryRegion> regions)
    {
        if (regions.Count is 0 or > MaxMemoryRegions)
            throw new ArgumentException($"a memory table holds 1 to {MaxMemoryRegions} regions, not {regions.Count}", nameof(regions));
        var p = new byte[8 + MemoryRegionSize * regions.Count];
        BinaryPrimitives.WriteUInt32LittleEndian(p, (uint)regions.Count);
        for (int i = 0; i < regions.Count; i++)
        {
            var s = p.AsSpan(8 + MemoryRegionSize * i);
            BinaryPrimitives.WriteUInt64LittleEndian(s, regions[i].GuestPhysAddr);
            BinaryPrimitives.WriteUInt64LittleEndian(s[8..], regions[i].MemorySize);
            BinaryPrimitives.WriteUInt64LittleEndian(s[16..], regions[i].UserspaceAddr);
            BinaryPrimitives.WriteUInt64LittleEndian(s[24..], regions[i].MmapOffset);
        }
        return p;
    }

    public static VhostUserMemoryRegion[] ParseMemoryTable(ReadOnlySpan<byte> p)
    {
        uint n = BinaryPrimitives.ReadUInt32LittleEndian(p);
        if (n > MaxMemoryRegions || p.Length != 8 + MemoryRegionSize * (int)n)
            throw new VhostUserException($"memory table of {p.Length} bytes does not hold {n} regions");
        var regions = new VhostUserMemoryRegion[n];
        for (int i = 0; i < n; i++)
        {
            var s = p[(8 + MemoryRegionSize * i)..];
            regions[i] = new(BinaryPrimitives.ReadUInt64LittleEndian(s), BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
                BinaryPrimitives.ReadUInt64LittleEndian(s[16..]), BinaryPrimitives.ReadUInt64LittleEndian(s[24..]));
        }
        return regions;
    }

    /// <summary>struct vhost_user_config: offset u32, size u32, flags u32, then size bytes of configuration.</summary>
    public static byte[] Config(uint offset, uint flags, ReadOnlySpan<byte> payload)
    {
        if (payload.Length > MaxConfigSize)
            throw new ArgumentException($"at most {MaxConfigSize} bytes of configuration", nameof(payload));
        var p = new byte[ConfigHeaderSize + payload.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(p, offset);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(4), (uint)payload.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(8), flags);
        payload.CopyTo(p.AsSpan(ConfigHeaderSize));
        return p;
    }
}

/// <summary>A vhost-user back-end broke the protocol, refused a request, went silent or went away. The message
/// names the socket and the request.</summary>
public sealed class VhostUserException(string message, Exception? inner = null) : Exception(message, inner);
