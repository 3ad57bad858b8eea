using System.Buffers.Binary;
using System.Text;
using Vmm.Interop;

namespace Vmm.TestGpu;

/// <summary>How the device reaches memory it was given with DMA_MAP but without a file descriptor: through
/// VFIO_USER_DMA_READ/DMA_WRITE messages to the client. False when the client refused.</summary>
internal interface IClientDma
{
    bool Read(ulong iova, Span<byte> destination);
    bool Write(ulong iova, ReadOnlySpan<byte> source);
}

/// <summary>One DMA_MAP'd range: mmapped from the client's fd, or reached through <see cref="IClientDma"/>.</summary>
internal sealed record DmaMap(ulong Iova, ulong Size, bool Writable, FileMapping? Mapping)
{
    public ulong End => Iova + Size;
}

/// <summary>The test GPU's device model (docs/test-gpu.md): PCI config space, the BAR0 registers and DMA engine,
/// BAR0 SRAM and BAR2 device memory in memfds, the ROM, and interrupt delivery through the eventfds the client set.
/// Single-threaded: the server's loop calls it.</summary>
internal sealed class TestGpu : IDisposable
{
    public const int RegionCount = 9, IrqIndexCount = 5;
    public const ulong Bar0Size = 16 << 20, SramStart = 0x10000, RomSize = 64 << 10, ConfigSize = 4096;
    public const uint MsixVectors = 8, MaxDmaLength = 16 << 20;

    // Config space layout (capabilities from 0x40 in the order the doc lists).
    private const int PmCap = 0x40, MsiCap = 0x48, PcieCap = 0x60, MsixCap = 0xA0, VendorCap = 0xB0;
    private const ushort CommandMemory = 1 << 1, CommandBusMaster = 1 << 2, CommandIntxDisable = 1 << 10;

    // BAR0 registers.
    public const uint RegId = 0x00, RegVersion = 0x04, RegScratch = 0x08, RegBar2SizeLo = 0x10, RegBar2SizeHi = 0x14,
        RegDmaSrcLo = 0x20, RegDmaSrcHi = 0x24, RegDmaDstLo = 0x28, RegDmaDstHi = 0x2C, RegDmaLen = 0x30, RegDmaPattern = 0x34,
        RegDmaVector = 0x38, RegDmaCmd = 0x3C, RegDmaStatus = 0x40, RegDmaCount = 0x44, RegIrqCount = 0x48, RegIrqAck = 0x4C,
        MsixTableOffset = 0x1000, MsixPbaOffset = 0x2000;
    public const uint IdValue = 0x47505530;
    public const uint CmdFill = 1, CmdCopy = 2, CmdCopyFromBar2 = 3, CmdCopyToBar2 = 4;
    public const uint StatusIdle = 0, StatusDone = 1, StatusError = 0x8000_0000;
    public const uint ErrorBadAddress = 1, ErrorBadLength = 2, ErrorBadCommand = 3, ErrorBusMasterOff = 4;

    private readonly byte[] _config = new byte[ConfigSize];
    private readonly byte[] _configWriteMask = new byte[ConfigSize];
    private readonly byte[] _rom = new byte[RomSize];
    private readonly byte[] _msixTable = new byte[MsixVectors * 16];
    private readonly List<DmaMap> _dmaMaps = [];
    private readonly IClientDma _clientDma;

    // Interrupts: eventfds per index and vector (-1: none), whether SET_IRQS enabled MSI/MSI-X, INTx line state.
    private readonly int[][] _irqFds = [[-1], [-1], [.. Enumerable.Repeat(-1, (int)MsixVectors)], [], []];
    private readonly bool[] _irqsEnabledBySetIrqs = new bool[IrqIndexCount];
    private bool _intxPending, _intxMasked;

    private uint _scratch, _dmaLen, _dmaPattern, _dmaVector, _dmaStatus, _dmaCount, _irqCount;
    private ulong _dmaSrc, _dmaDst;

    public TestGpu(ulong bar2Size, IClientDma clientDma)
    {
        Bar2Size = bar2Size;
        _clientDma = clientDma;
        // Both memories are sparse memfds: ftruncate only, nothing touched, so 8 GiB of BAR2 costs nothing.
        Bar0Fd = Sys.MemfdCreate("vfio-user-gpu-bar0");
        Sys.Ftruncate(Bar0Fd, (long)Bar0Size, "BAR0 memfd");
        Bar0 = FileMapping.Map(Bar0Fd, 0, Bar0Size, writable: true, "BAR0 SRAM");
        Bar2Fd = Sys.MemfdCreate("vfio-user-gpu-bar2");
        Sys.Ftruncate(Bar2Fd, (long)bar2Size, "BAR2 memfd");
        Bar2 = FileMapping.Map(Bar2Fd, 0, bar2Size, writable: true, "BAR2");
        _rom[0] = 0x55;
        _rom[1] = 0xAA;
        Encoding.ASCII.GetBytes("vmm test GPU ROM", _rom.AsSpan(2));
        ResetConfig();
    }

    public ulong Bar2Size { get; }

    /// <summary>The memfd behind BAR0 (offset = BAR0 offset; only [SramStart, Bar0Size) is offered for mmap).</summary>
    public int Bar0Fd { get; }
    public int Bar2Fd { get; }
    public FileMapping Bar0 { get; }
    public FileMapping Bar2 { get; }

    /// <summary>DMA operations completed successfully and interrupts raised since start (not cleared by reset).</summary>
    public long TotalDmaOps { get; private set; }
    public long TotalIrqs { get; private set; }
    public long DmaErrors { get; private set; }

    public int IntxUnmaskFd { get; private set; } = -1;

    private ushort Command => BinaryPrimitives.ReadUInt16LittleEndian(_config.AsSpan(0x04));
    private bool BusMaster => (Command & CommandBusMaster) != 0;
    private bool IntxDisabled => (Command & CommandIntxDisable) != 0;

    /// <summary>MSI/MSI-X are on when the guest set the enable bit (vmm forwards the control write) or when the
    /// client attached eventfds with SET_IRQS (how kernel VFIO enables them).</summary>
    private bool MsiEnabled => (_config[MsiCap + 2] & 1) != 0 || _irqsEnabledBySetIrqs[1];
    private bool MsixEnabled => (_config[MsixCap + 3] & 0x80) != 0 || _irqsEnabledBySetIrqs[2];

    // ---- config space ----

    private void ResetConfig()
    {
        Array.Clear(_config);
        Array.Clear(_configWriteMask);
        var c = _config.AsSpan();
        W16(c, 0x00, 0x1B36);
        W16(c, 0x02, 0x7001);
        W16(c, 0x06, 0x0010); // status: capabilities list
        c[0x08] = 1; // revision
        c[0x09] = 0; // prog-if
        c[0x0A] = 0x02; // 3D controller
        c[0x0B] = 0x03; // display controller
        W32(c, 0x10, 0x0); // BAR0: memory, 32-bit, non-prefetchable
        W32(c, 0x18, 0xC); // BAR2: memory, 64-bit (type 2), prefetchable; BAR3 is its upper half
        W16(c, 0x2C, 0x1B36);
        W16(c, 0x2E, 0x7001);
        c[0x34] = PmCap;
        c[0x3D] = 1; // INTA

        // Power management: version 3, PMCSR power state writable.
        c[PmCap] = 0x01; c[PmCap + 1] = MsiCap; W16(c, PmCap + 2, 0x0003);
        // MSI: 64-bit capable, one vector, no per-vector masking.
        c[MsiCap] = 0x05; c[MsiCap + 1] = PcieCap; W16(c, MsiCap + 2, 0x0080);
        // PCI Express v2, endpoint; link x1 at 2.5 GT/s.
        c[PcieCap] = 0x10; c[PcieCap + 1] = MsixCap; W16(c, PcieCap + 2, 0x0002);
        W32(c, PcieCap + 0x0C, 0x11);
        W16(c, PcieCap + 0x12, 0x11);
        // MSI-X: 8 vectors, table BAR0+0x1000, PBA BAR0+0x2000.
        c[MsixCap] = 0x11; c[MsixCap + 1] = VendorCap; W16(c, MsixCap + 2, (ushort)(MsixVectors - 1));
        W32(c, MsixCap + 4, MsixTableOffset);
        W32(c, MsixCap + 8, MsixPbaOffset);
        // Vendor-specific, 8 bytes: length, a zero version byte, "vGPU".
        c[VendorCap] = 0x09; c[VendorCap + 1] = 0; c[VendorCap + 2] = 8;
        Encoding.ASCII.GetBytes("vGPU", c.Slice(VendorCap + 4));
        // Extended capabilities at 0x100: none (an empty header).

        var m = _configWriteMask.AsSpan();
        W16(m, 0x04, CommandMemory | CommandBusMaster | (1 << 6) | (1 << 8) | CommandIntxDisable);
        W32(m, 0x10, ~(uint)(Bar0Size - 1)); // BAR sizing falls out of the mask: the low bits read back as the type
        ulong bar2Mask = ~(Bar2Size - 1);
        W32(m, 0x18, (uint)bar2Mask);
        W32(m, 0x1C, (uint)(bar2Mask >> 32));
        W32(m, 0x30, ~(uint)(RomSize - 1) | 1);
        m[0x0C] = 0xFF; // cache line size
        m[0x3C] = 0xFF; // interrupt line
        m[PmCap + 4] = 0x03;
        m[MsiCap + 2] = 0x01; // MSI enable (one vector: multiple message enable stays 0)
        W32(m, MsiCap + 4, 0xFFFF_FFFC);
        W32(m, MsiCap + 8, 0xFFFF_FFFF);
        W16(m, MsiCap + 12, 0xFFFF);
        W16(m, PcieCap + 8, 0x7FFF); // device control (not "initiate FLR")
        m[MsixCap + 3] = 0xC0; // MSI-X enable, function mask
    }

    public void ReadConfig(ulong offset, Span<byte> data)
    {
        // Status bit 3 reflects the INTx line.
        _config[0x06] = (byte)((_config[0x06] & ~0x08) | (_intxPending ? 0x08 : 0));
        _config.AsSpan((int)offset, data.Length).CopyTo(data);
    }

    public void ReadRom(ulong offset, Span<byte> data) => _rom.AsSpan((int)offset, data.Length).CopyTo(data);

    public void WriteConfig(ulong offset, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
        {
            int at = (int)offset + i;
            _config[at] = (byte)((_config[at] & ~_configWriteMask[at]) | (data[i] & _configWriteMask[at]));
        }
        UpdateIntx();
    }

    // ---- BAR0 registers ----

    public void ReadRegisters(ulong offset, Span<byte> data)
    {
        // Any size: compose from the dwords that cover the range (reads have no side effects).
        for (int i = 0; i < data.Length; i++)
        {
            ulong at = offset + (ulong)i;
            uint dword = ReadRegister((uint)(at & ~3UL));
            data[i] = (byte)(dword >> (int)(8 * (at & 3)));
        }
    }

    public bool WriteRegisters(ulong offset, ReadOnlySpan<byte> data)
    {
        if (offset % 4 != 0 || (data.Length != 4 && data.Length != 8))
            return false;
        for (int i = 0; i < data.Length; i += 4)
            WriteRegister((uint)offset + (uint)i, BinaryPrimitives.ReadUInt32LittleEndian(data[i..]));
        return true;
    }

    private uint ReadRegister(uint offset)
    {
        if (offset >= MsixTableOffset && offset < MsixTableOffset + _msixTable.Length)
            return BinaryPrimitives.ReadUInt32LittleEndian(_msixTable.AsSpan((int)(offset - MsixTableOffset)));
        return offset switch
        {
            RegId => IdValue,
            RegVersion => 1,
            RegScratch => _scratch,
            RegBar2SizeLo => (uint)Bar2Size,
            RegBar2SizeHi => (uint)(Bar2Size >> 32),
            RegDmaSrcLo => (uint)_dmaSrc,
            RegDmaSrcHi => (uint)(_dmaSrc >> 32),
            RegDmaDstLo => (uint)_dmaDst,
            RegDmaDstHi => (uint)(_dmaDst >> 32),
            RegDmaLen => _dmaLen,
            RegDmaPattern => _dmaPattern,
            RegDmaVector => _dmaVector,
            RegDmaStatus => _dmaStatus,
            RegDmaCount => _dmaCount,
            RegIrqCount => _irqCount,
            _ => 0, // DMA_CMD and IRQ_ACK are write-only, the PBA stays 0 (vmm emulates it), the rest is reserved
        };
    }

    private void WriteRegister(uint offset, uint value)
    {
        if (offset >= MsixTableOffset && offset < MsixTableOffset + _msixTable.Length)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(_msixTable.AsSpan((int)(offset - MsixTableOffset)), value);
            return;
        }
        switch (offset)
        {
            case RegScratch: _scratch = value; break;
            case RegDmaSrcLo: _dmaSrc = (_dmaSrc & ~0xFFFF_FFFFUL) | value; break;
            case RegDmaSrcHi: _dmaSrc = (_dmaSrc & 0xFFFF_FFFFUL) | ((ulong)value << 32); break;
            case RegDmaDstLo: _dmaDst = (_dmaDst & ~0xFFFF_FFFFUL) | value; break;
            case RegDmaDstHi: _dmaDst = (_dmaDst & 0xFFFF_FFFFUL) | ((ulong)value << 32); break;
            case RegDmaLen: _dmaLen = value; break;
            case RegDmaPattern: _dmaPattern = value; break;
            case RegDmaVector: _dmaVector = value; break;
            case RegDmaCmd:
                _dmaStatus = RunDma(value);
                if (_dmaStatus == StatusDone)
                {
                    _dmaCount++;
                    TotalDmaOps++;
                }
                else
                {
                    DmaErrors++;
                }
                RaiseInterrupt();
                break;
            case RegIrqAck:
                _intxPending = false;
                break;
        }
    }

    // ---- DMA engine ----

    /// <summary>Runs one DMA command to completion; returns the DMA_STATUS value. A transfer must lie inside one
    /// DMA_MAP'd range (a range that spans two adjacent maps is refused as "not mapped").</summary>
    private uint RunDma(uint command)
    {
        if (command is < CmdFill or > CmdCopyToBar2)
            return StatusError | ErrorBadCommand;
        if (!BusMaster)
            return StatusError | ErrorBusMasterOff;
        if (_dmaLen == 0 || _dmaLen > MaxDmaLength || _dmaLen % 4 != 0)
            return StatusError | ErrorBadLength;
        int length = (int)_dmaLen;
        switch (command)
        {
            case CmdFill:
            {
                var buffer = new byte[length];
                for (int i = 0; i < length; i += 4)
                    BinaryPrimitives.WriteUInt32LittleEndian(buffer.AsSpan(i), _dmaPattern);
                return WriteIova(_dmaDst, buffer) ? StatusDone : StatusError | ErrorBadAddress;
            }
            case CmdCopy:
            {
                var buffer = new byte[length];
                return ReadIova(_dmaSrc, buffer) && WriteIova(_dmaDst, buffer) ? StatusDone : StatusError | ErrorBadAddress;
            }
            case CmdCopyFromBar2:
                if (!InBar2(_dmaSrc, _dmaLen))
                    return StatusError | ErrorBadAddress;
                return WriteIova(_dmaDst, Bar2.GetSpan(_dmaSrc, length)) ? StatusDone : StatusError | ErrorBadAddress;
            default: // CmdCopyToBar2
                if (!InBar2(_dmaDst, _dmaLen))
                    return StatusError | ErrorBadAddress;
                return ReadIova(_dmaSrc, Bar2.GetSpan(_dmaDst, length)) ? StatusDone : StatusError | ErrorBadAddress;
        }
    }

    private bool InBar2(ulong offset, uint length) => offset <= Bar2Size && length <= Bar2Size - offset;

    private DmaMap? FindMap(ulong iova, int length, bool write)
    {
        foreach (var m in _dmaMaps)
        {
            if (iova >= m.Iova && iova - m.Iova <= m.Size && (ulong)length <= m.Size - (iova - m.Iova))
                return write && !m.Writable ? null : m;
        }
        return null;
    }

    private bool ReadIova(ulong iova, Span<byte> destination)
    {
        var map = FindMap(iova, destination.Length, write: false);
        if (map is null)
            return false;
        if (map.Mapping is null)
            return _clientDma.Read(iova, destination);
        map.Mapping.GetSpan(iova - map.Iova, destination.Length).CopyTo(destination);
        return true;
    }

    private bool WriteIova(ulong iova, ReadOnlySpan<byte> source)
    {
        var map = FindMap(iova, source.Length, write: true);
        if (map is null)
            return false;
        if (map.Mapping is null)
            return _clientDma.Write(iova, source);
        source.CopyTo(map.Mapping.GetSpan(iova - map.Iova, source.Length));
        return true;
    }

    /// <summary>DMA_MAP: errno or 0. Overlapping an existing map is EEXIST (the spec).</summary>
    public int AddDmaMap(ulong iova, ulong size, bool writable, int fd, ulong fdOffset)
    {
        if (size == 0 || iova + size < iova || fdOffset > long.MaxValue)
            return Errno.EINVAL;
        if (_dmaMaps.Count >= 65535)
            return Errno.ENOSPC;
        foreach (var m in _dmaMaps)
        {
            if (iova < m.End && m.Iova < iova + size)
                return Errno.EEXIST;
        }
        FileMapping? mapping = null;
        if (fd >= 0)
        {
            try
            {
                mapping = FileMapping.Map(fd, (long)fdOffset, size, writable, $"DMA map 0x{iova:x}+0x{size:x}");
            }
            catch (SyscallException e)
            {
                return e.ErrorNumber;
            }
        }
        _dmaMaps.Add(new DmaMap(iova, size, writable, mapping));
        return 0;
    }

    public int RemoveDmaMap(ulong iova, ulong size)
    {
        int i = _dmaMaps.FindIndex(m => m.Iova == iova && m.Size == size);
        if (i < 0)
            return Errno.ENOENT;
        _dmaMaps[i].Mapping?.Dispose();
        _dmaMaps.RemoveAt(i);
        return 0;
    }

    // ---- interrupts ----

    /// <summary>After a DMA command: MSI-X vector DMA_VECTOR if MSI-X is on, else MSI, else INTx (unless the command
    /// register disables it). MSI and MSI-X are memory writes, so they need the bus-master bit; INTx does not.</summary>
    private void RaiseInterrupt()
    {
        if (MsixEnabled)
        {
            if (!BusMaster)
                return;
            if (_dmaVector < MsixVectors)
                Signal(_irqFds[2][_dmaVector]);
        }
        else if (MsiEnabled)
        {
            if (!BusMaster)
                return;
            Signal(_irqFds[1][0]);
        }
        else if (!IntxDisabled)
        {
            _intxPending = true;
            UpdateIntx();
        }
        else
        {
            return;
        }
        _irqCount++;
        TotalIrqs++;
    }

    /// <summary>Level-triggered INTx over an edge eventfd, VFIO style: while the line is asserted and not masked,
    /// signal once and mask (AUTOMASKED); the client's unmask (resamplefd at the guest's EOI) re-signals if the line
    /// is still asserted.</summary>
    private void UpdateIntx()
    {
        if (_intxPending && !_intxMasked && !IntxDisabled && _irqFds[0][0] >= 0)
        {
            Signal(_irqFds[0][0]);
            _intxMasked = true;
        }
    }

    public void UnmaskIntx()
    {
        _intxMasked = false;
        UpdateIntx();
    }

    public void MaskIntx() => _intxMasked = true;

    private static void Signal(int fd)
    {
        if (fd < 0)
            return;
        Span<byte> one = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(one, 1);
        Uio.Write(fd, one);
    }

    public static uint IrqCount(int index) => index switch { 0 => 1, 1 => 1, 2 => MsixVectors, _ => 0 };

    public static uint IrqFlags(int index) => index switch
    {
        0 => VfioConstants.VFIO_IRQ_INFO_EVENTFD | VfioConstants.VFIO_IRQ_INFO_MASKABLE | VfioConstants.VFIO_IRQ_INFO_AUTOMASKED,
        1 or 2 => VfioConstants.VFIO_IRQ_INFO_EVENTFD | VfioConstants.VFIO_IRQ_INFO_NORESIZE,
        _ => 0,
    };

    /// <summary>SET_IRQS DATA_EVENTFD|ACTION_TRIGGER: takes ownership of <paramref name="fds"/> (empty: detach the
    /// vectors). The caller checked the range.</summary>
    public void SetTriggerFds(int index, int start, int count, ReadOnlySpan<int> fds)
    {
        for (int i = 0; i < count; i++)
        {
            Sys.Close(_irqFds[index][start + i]);
            _irqFds[index][start + i] = fds.IsEmpty ? -1 : fds[i];
        }
        _irqsEnabledBySetIrqs[index] = _irqFds[index].Any(fd => fd >= 0);
        if (index == 0)
            UpdateIntx();
    }

    /// <summary>SET_IRQS DATA_NONE|ACTION_TRIGGER with count 0: the index is disabled, its eventfds closed.</summary>
    public void DisableIrqs(int index)
    {
        SetTriggerFds(index, 0, _irqFds[index].Length, default);
        if (index == 0)
        {
            SetIntxUnmaskFd(-1);
            _intxMasked = false;
        }
    }

    /// <summary>SET_IRQS DATA_NONE/BOOL|ACTION_TRIGGER: the client fires vectors itself (a loopback test).</summary>
    public void TriggerVector(int index, int vector) => Signal(_irqFds[index][vector]);

    public void SetIntxUnmaskFd(int fd)
    {
        Sys.Close(IntxUnmaskFd);
        IntxUnmaskFd = fd;
    }

    // ---- reset and report ----

    /// <summary>DEVICE_RESET (a function-level reset): registers and config space back to power-on values,
    /// MSI/MSI-X off, the INTx line low. Device memory (SRAM, BAR2), DMA maps and eventfds stay.</summary>
    public void Reset()
    {
        _scratch = _dmaLen = _dmaPattern = _dmaVector = _dmaStatus = _dmaCount = _irqCount = 0;
        _dmaSrc = _dmaDst = 0;
        Array.Clear(_msixTable);
        Array.Clear(_irqsEnabledBySetIrqs);
        _intxPending = _intxMasked = false;
        ResetConfig();
    }

    /// <summary>FNV-1a 64 of the first and the last 64 KiB of BAR2.</summary>
    public ulong Bar2Fnv()
    {
        ulong h = Fnv.Basis;
        h = Fnv.Hash(h, Bar2.GetSpan(0, 64 << 10));
        return Fnv.Hash(h, Bar2.GetSpan(Bar2Size - (64 << 10), 64 << 10));
    }

    /// <summary>FNV-1a 64 of the whole SRAM area [0x10000, 16 MiB) of BAR0.</summary>
    public ulong SramFnv() => Fnv.Hash(Fnv.Basis, Bar0.GetSpan(SramStart, (int)(Bar0Size - SramStart)));

    public void Dispose()
    {
        foreach (var m in _dmaMaps)
            m.Mapping?.Dispose();
        _dmaMaps.Clear();
        foreach (var fds in _irqFds)
        {
            for (int i = 0; i < fds.Length; i++)
            {
                Sys.Close(fds[i]);
                fds[i] = -1;
            }
        }
        SetIntxUnmaskFd(-1);
        Bar0.Dispose();
        Bar2.Dispose();
        Sys.Close(Bar0Fd);
        Sys.Close(Bar2Fd);
    }

    private static void W16(Span<byte> s, int at, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(s[at..], v);
    private static void W32(Span<byte> s, int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(s[at..], v);
}

/// <summary>FNV-1a 64 (no OpenSSL: the nested VM has none).</summary>
internal static class Fnv
{
    public const ulong Basis = 0xcbf29ce484222325, Prime = 0x100000001b3;

    public static ulong Hash(ulong h, ReadOnlySpan<byte> data)
    {
        foreach (byte b in data)
            h = (h ^ b) * Prime;
        return h;
    }
}
