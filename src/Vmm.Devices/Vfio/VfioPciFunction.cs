using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Interop;

namespace Vmm.Devices.Vfio;

/// <summary>A passed-through device on vmm's PCI root bus: whatever carries it (kernel VFIO, iommufd, vfio-user),
/// the guest sees its configuration space through this model, which keeps a virtual copy of the registers vmm must
/// own and passes the rest through to the device's config region (index 7).
/// <list type="bullet">
/// <item>Emulated: command register (memory, bus master and INTx disable, forwarded to the device), header type
/// (single function), BAR0-5 and the expansion ROM BAR (sized from the region info, placed by the root bus; I/O
/// BARs are left out — vmm's bus has no I/O window), capabilities pointer, interrupt line and pin, each
/// capability's ID/next bytes (to unlink hidden ones), MSI and MSI-X.</item>
/// <item>Hidden (unlinked): extended SR-IOV, MR-IOV, ARI (vmm shows one function), Resizable BAR and VF Resizable
/// BAR (vmm places BARs at the size the region has; a resize would need the host to resize and vmm to re-place).</item>
/// <item>Passed through for reads, everything else. Guest writes reach the device only for: status error bits
/// (W1C), cache line size, latency timer, PM control/status (power state, PME enable, PME status), PCIe device
/// control (not Initiate FLR: resets go through VFIO), device status (W1C), device control 2 (completion timeout,
/// AtomicOp requester, LTR), AER uncorrectable/correctable status (W1C). Other writes are dropped.</item>
/// </list>
/// MSI-X table and PBA are virtual (<see cref="MsixTable"/> in passthrough mode) and trapped; the rest of each
/// BAR's mmappable areas is mapped into the guest (<see cref="IGuestMemoryMapper"/>) while the BAR decodes, so
/// guest accesses there never exit. Interrupts go device → eventfd → KVM irqfd with no vmm code per interrupt.
/// The function owns <paramref name="device"/> and disposes it.</summary>
public sealed class VfioPciFunction : PciFunction, IDisposable
{
    private const int MaxLoggedErrors = 16;
    private const ushort ForwardedCommandBits =
        PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster | PciConfigSpace.CommandInterruptDisable;

    private readonly IVfioDevice _device;
    private readonly IGuestMemoryMapper _mapper;
    private readonly IIntxIrqfdLine? _intxLine;
    private readonly Action<string>? _log;
    private readonly int _configRegionSize;
    /// <summary>Where the legacy capabilities must end: 256 bytes, or a shorter config region's end (a vfio-user server
    /// declares its size; found by the pci-vfio fuzz target).</summary>
    private readonly int _legacyEnd;
    private readonly bool[] _emulated = new bool[PciConfigSpace.Size];
    private readonly byte[] _deviceWritable = new byte[PciConfigSpace.Size];
    private readonly BarMapping?[] _bars = new BarMapping?[6];
    private readonly ulong _romRegionSize;
    private readonly VfioMsi? _msi;
    private readonly int[] _msixFds = [];
    private readonly List<PciCapabilityEntry> _presented = [];
    private readonly EventFd? _intxTrigger, _intxResample;
    private IDisposable? _intxAttachment;
    private InterruptMode _mode;
    private int _errors;
    private bool _disposed;

    /// <summary>Which interrupt the device has enabled in VFIO.</summary>
    public enum InterruptMode { None, Intx, Msi, Msix }

    /// <summary>Resets <paramref name="device"/> (function-level, when it can), reads its configuration space and
    /// builds the virtual one. <paramref name="intx"/> is the pin's irqfd line, or null for no INTx.</summary>
    public VfioPciFunction(IVfioDevice device, IMsiController msi, IGuestMemoryMapper mapper, IIntxIrqfdLine? intx,
        Action<string>? log)
        : this(device, msi, mapper, intx, log, Snapshot(device, log))
    {
    }

    private VfioPciFunction(IVfioDevice device, IMsiController msi, IGuestMemoryMapper mapper, IIntxIrqfdLine? intx,
        Action<string>? log, byte[] snapshot)
        : base(new PciConfigSpace(
            BinaryPrimitives.ReadUInt16LittleEndian(snapshot.AsSpan(PciConfigSpace.VendorId)),
            BinaryPrimitives.ReadUInt16LittleEndian(snapshot.AsSpan(PciConfigSpace.DeviceId)),
            snapshot[PciConfigSpace.ClassCode], snapshot[PciConfigSpace.SubClass], snapshot[PciConfigSpace.ProgIf],
            snapshot[PciConfigSpace.RevisionId],
            BinaryPrimitives.ReadUInt16LittleEndian(snapshot.AsSpan(PciConfigSpace.SubsystemVendorId)),
            BinaryPrimitives.ReadUInt16LittleEndian(snapshot.AsSpan(PciConfigSpace.SubsystemId))))
    {
        _device = device;
        _mapper = mapper;
        _log = log;
        _configRegionSize = (int)Math.Min(device.GetRegionInfo(VfioRegionIndex.Config).Size, PciConfigSpace.Size);
        _legacyEnd = Math.Min(_configRegionSize, PciConfigSpace.LegacySize);
        var config = snapshot.AsSpan(0, _configRegionSize);
        try
        {
            EmulateHeader(config);
            DeclareBars(config);
            _romRegionSize = DeclareRom();
            (_msi, Msix) = BuildCapabilities(config, msi);
            if (Msix is not null)
            {
                _msixFds = new int[Msix.Count];
                for (int i = 0; i < Msix.Count; i++)
                    _msixFds[i] = Msix.Vector(i).EventFd.Fd;
            }
            PlanBarMappings();

            byte pin = config[PciConfigSpace.InterruptPin];
            if (pin is >= 1 and <= 4 && intx is not null && device.GetIrqInfo(VfioIrqIndex.Intx).Count > 0)
            {
                _intxLine = intx;
                _intxTrigger = new EventFd();
                _intxResample = new EventFd();
                Config.SetInterruptPin(pin);
            }
            else if (pin != 0)
                Log($"INTx pin {pin} not offered to the guest ({(intx is null ? "no INTx line" : pin > 4 ? "invalid pin" : "VFIO reports no INTx")})");

            ForwardCommand();
            UpdateInterruptMode();
        }
        catch
        {
            _intxTrigger?.Dispose();
            _intxResample?.Dispose();
            throw;
        }
    }

    public override string Name => _device.Name;

    public IVfioDevice Device => _device;

    /// <summary>The emulated MSI-X capability, table and PBA (null when the device has none).</summary>
    public MsixTable? Msix { get; }

    /// <summary>The emulated MSI capability (null when the device has none).</summary>
    public VfioMsi? Msi => _msi;

    public InterruptMode Mode => _mode;

    /// <summary>The capabilities the guest sees, in chain order (legacy, then extended).</summary>
    public IReadOnlyList<PciCapabilityEntry> PresentedCapabilities => _presented;

    // ---- construction ----

    private static byte[] Snapshot(IVfioDevice device, Action<string>? log)
    {
        if (!device.IsPci)
            throw new VfioException($"{device.Name}: not a PCI device (VFIO_DEVICE_FLAGS_PCI is clear)");
        if (device.RegionCount <= VfioRegionIndex.Config)
            throw new VfioException($"{device.Name}: {device.RegionCount} regions; a PCI device has a config region (index 7)");
        if (device.CanReset)
        {
            try
            {
                device.Reset(); // start from the state a guest expects at power-on
            }
            catch (Exception e)
            {
                log?.Invoke($"{device.Name}: function-level reset failed, continuing without: {e.Message}");
            }
        }
        var info = device.GetRegionInfo(VfioRegionIndex.Config);
        if (info.Size < 64 || !info.Readable)
            throw new VfioException($"{device.Name}: config region is {info.Size} bytes{(info.Readable ? "" : ", not readable")}; a PCI header needs 64");
        var snapshot = new byte[PciConfigSpace.Size];
        device.ReadRegion(VfioRegionIndex.Config, 0, snapshot.AsSpan(0, (int)Math.Min(info.Size, PciConfigSpace.Size)));
        byte headerType = (byte)(snapshot[PciConfigSpace.HeaderType] & 0x7F);
        if (headerType != 0)
            throw new VfioException($"{device.Name}: header type {headerType} (a bridge or CardBus); only endpoints (type 0) can be passed through");
        return snapshot;
    }

    private void Emulate(int offset, int length) => _emulated.AsSpan(offset, length).Fill(true);

    private void DeviceWritable(int offset, int length, uint mask)
    {
        for (int i = 0; i < length; i++)
            _deviceWritable[offset + i] = (byte)(mask >> (8 * i));
    }

    private void EmulateHeader(ReadOnlySpan<byte> config)
    {
        // No I/O BARs, so no I/O space bit; the three bits vmm forwards are the guest's to change.
        Config.SetWritable(PciConfigSpace.Command, 2, ForwardedCommandBits);
        Emulate(PciConfigSpace.Command, 2);
        Config.Set8(PciConfigSpace.HeaderType, 0); // one function: the multi-function bit is vmm's to say
        Emulate(PciConfigSpace.HeaderType, 1);
        Emulate(PciConfigSpace.Bar0, 24);
        Emulate(PciConfigSpace.ExpansionRom, 4);
        Emulate(PciConfigSpace.CapabilitiesPointer, 8); // pointer and the reserved bytes after it
        Emulate(PciConfigSpace.InterruptLine, 2);
        DeviceWritable(PciConfigSpace.Status, 2, 0xF900); // error bits, write-1-to-clear
        DeviceWritable(0x0C, 2, 0xFFFF);                  // cache line size, latency timer
    }

    private void DeclareBars(ReadOnlySpan<byte> config)
    {
        for (int i = 0; i < 6; i++)
        {
            uint register = BinaryPrimitives.ReadUInt32LittleEndian(config[(PciConfigSpace.Bar0 + 4 * i)..]);
            var info = i < _device.RegionCount ? _device.GetRegionInfo(i) : null;
            if (info is null || info.Size == 0)
                continue;
            if ((register & 1) != 0)
            {
                Log($"BAR{i}: I/O space (0x{info.Size:x} bytes) is not supported by vmm's PCI bus; the guest sees no BAR{i}");
                continue;
            }
            bool is64 = ((register >> 1) & 3) == 2;
            bool prefetchable = (register & 8) != 0;
            if (is64 && i == 5)
            {
                Log("BAR5: declared 64-bit, but there is no BAR6 for the upper half; left out");
                continue;
            }
            if ((info.Size & (info.Size - 1)) != 0 || info.Size < 16 || (!is64 && info.Size > 1UL << 31))
                throw new VfioException($"{_device.Name}: BAR{i} region is 0x{info.Size:x} bytes; a {(is64 ? 64 : 32)}-bit memory BAR is a power of two from 16 bytes{(is64 ? "" : " to 2 GiB")}");
            var bar = Config.AddBar(i, info.Size, is64 ? PciBarKind.Memory64 : PciBarKind.Memory32, prefetchable);
            _bars[i] = new BarMapping(bar, info);
            if (is64)
                i++; // the upper half
        }
    }

    private ulong DeclareRom()
    {
        if (_device.RegionCount <= VfioRegionIndex.Rom)
            return 0;
        var info = _device.GetRegionInfo(VfioRegionIndex.Rom);
        if (info.Size == 0 || !info.Readable)
            return 0;
        if (info.Size > 1UL << 31)
        {
            Log($"expansion ROM: 0x{info.Size:x} bytes is more than a ROM BAR can decode; left out");
            return 0;
        }
        ulong size = Math.Max(2048UL, info.Size);
        if ((size & (size - 1)) != 0)
            size = 1UL << (64 - System.Numerics.BitOperations.LeadingZeroCount(size));
        Config.AddRomBar(size);
        return info.Size;
    }

    /// <summary>Whether the guest must not see extended capability <paramref name="id"/> (see the class summary).</summary>
    public static bool IsHiddenExtendedCapability(ushort id) => id is 0 or PciCapabilityWalker.ExtSriov
        or PciCapabilityWalker.ExtMriov or PciCapabilityWalker.ExtAri or PciCapabilityWalker.ExtResizableBar
        or PciCapabilityWalker.ExtVfResizableBar;

    private (VfioMsi?, MsixTable?) BuildCapabilities(ReadOnlySpan<byte> config, IMsiController controller)
    {
        VfioMsi? msi = null;
        MsixTable? msix = null;
        var legacy = new List<PciCapabilityEntry>();
        foreach (var cap in PciCapabilityWalker.Legacy(config, Log))
        {
            Emulate(cap.Offset, 2);
            Config.Set8(cap.Offset, (byte)cap.Id);
            switch (cap.Id)
            {
                case PciConfigSpace.CapabilityMsi when msi is null:
                    msi = BuildMsi(config, cap.Offset, controller);
                    if (msi is null)
                        continue;
                    break;
                case PciConfigSpace.CapabilityMsix when msix is null:
                    msix = BuildMsix(config, cap.Offset, controller);
                    if (msix is null)
                        continue;
                    break;
                case PciConfigSpace.CapabilityMsi or PciConfigSpace.CapabilityMsix:
                    Log($"a second {(cap.Id == PciConfigSpace.CapabilityMsi ? "MSI" : "MSI-X")} capability at 0x{cap.Offset:x2}; hidden");
                    continue;
                case PciCapabilityWalker.CapPowerManagement:
                    DeviceWritable(cap.Offset + 4, 2, 0x8103); // PMCSR: power state, PME enable, PME status (W1C)
                    break;
                case PciConfigSpace.CapabilityPciExpress when cap.Offset + 0x2C <= _legacyEnd:
                    DeviceWritable(cap.Offset + 0x08, 2, 0x7FFF); // device control, not Initiate FLR
                    DeviceWritable(cap.Offset + 0x0A, 2, 0x000F); // device status error bits (W1C)
                    DeviceWritable(cap.Offset + 0x28, 2, 0x045F); // device control 2: completion timeout, AtomicOp, LTR
                    break;
            }
            legacy.Add(cap);
        }
        for (int i = 0; i < legacy.Count; i++)
            Config.Set8(legacy[i].Offset + 1, (byte)(i + 1 < legacy.Count ? legacy[i + 1].Offset : 0));
        Config.Set8(PciConfigSpace.CapabilitiesPointer, (byte)(legacy.Count > 0 ? legacy[0].Offset : 0));
        _presented.AddRange(legacy);

        var extended = new List<PciCapabilityEntry>();
        var all = PciCapabilityWalker.Extended(config, Log);
        foreach (var cap in all)
        {
            Emulate(cap.Offset, 4);
            if (IsHiddenExtendedCapability(cap.Id))
            {
                if (cap.Id != 0)
                    Log($"extended capability 0x{cap.Id:x4} at 0x{cap.Offset:x3} hidden from the guest");
                continue;
            }
            if (cap.Id == PciCapabilityWalker.ExtAer && cap.Offset + 0x14 <= _configRegionSize)
            {
                DeviceWritable(cap.Offset + 0x04, 4, 0xFFFF_FFFF); // uncorrectable error status (W1C)
                DeviceWritable(cap.Offset + 0x10, 4, 0xFFFF_FFFF); // correctable error status (W1C)
            }
            extended.Add(cap);
        }
        if (all.Count > 0)
        {
            // The list starts at 0x100 by definition: when the capability there is hidden, an ID-0 header links on.
            if (extended.Count == 0 || extended[0].Offset != PciConfigSpace.LegacySize)
                Config.Set32(PciConfigSpace.LegacySize, extended.Count > 0 ? (uint)extended[0].Offset << 20 : 0);
            for (int i = 0; i < extended.Count; i++)
            {
                uint next = i + 1 < extended.Count ? (uint)extended[i + 1].Offset : 0;
                Config.Set32(extended[i].Offset, extended[i].Id | ((uint)extended[i].Version << 16) | (next << 20));
            }
        }
        _presented.AddRange(extended);
        return (msi, msix);
    }

    private VfioMsi? BuildMsi(ReadOnlySpan<byte> config, int offset, IMsiController controller)
    {
        uint count = _device.GetIrqInfo(VfioIrqIndex.Msi).Count;
        if (count == 0)
        {
            Log($"MSI capability at 0x{offset:x2} hidden: VFIO offers no MSI vectors");
            return null;
        }
        ushort control = BinaryPrimitives.ReadUInt16LittleEndian(config[(offset + 2)..]);
        int length = ((control & 0x80) != 0 ? 14 : 10) + ((control & 0x100) != 0 ? 10 : 0);
        if (offset + length > _legacyEnd)
        {
            Log($"MSI capability at 0x{offset:x2} runs past 0x{_legacyEnd - 1:X2}; hidden");
            return null;
        }
        var msi = new VfioMsi(Config, offset, control, count, controller, _device.Name);
        Emulate(offset, msi.Length);
        return msi;
    }

    private MsixTable? BuildMsix(ReadOnlySpan<byte> config, int offset, IMsiController controller)
    {
        if (offset + 12 > _legacyEnd)
        {
            Log($"MSI-X capability at 0x{offset:x2} runs past 0x{_legacyEnd - 1:X2}; hidden");
            return null;
        }
        int size = (BinaryPrimitives.ReadUInt16LittleEndian(config[(offset + 2)..]) & 0x7FF) + 1;
        uint table = BinaryPrimitives.ReadUInt32LittleEndian(config[(offset + 4)..]);
        uint pba = BinaryPrimitives.ReadUInt32LittleEndian(config[(offset + 8)..]);
        int tableBar = (int)(table & 7), pbaBar = (int)(pba & 7);
        uint tableOffset = table & ~7u, pbaOffset = pba & ~7u;
        uint count = Math.Min((uint)size, _device.GetIrqInfo(VfioIrqIndex.Msix).Count);
        string? problem = null;
        if (count == 0)
            problem = "VFIO offers no MSI-X vectors";
        else if (tableBar > 5 || _bars[tableBar] is not { } tb || tableOffset + (ulong)size * MsixTable.EntrySize > tb.Bar.Size)
            problem = $"its table (BAR{tableBar} + 0x{tableOffset:x}, {size} entries) is outside the memory BARs";
        else if (pbaBar > 5 || _bars[pbaBar] is not { } pb || pbaOffset + (ulong)(size + 63) / 64 * 8 > pb.Bar.Size)
            problem = $"its PBA (BAR{pbaBar} + 0x{pbaOffset:x}) is outside the memory BARs";
        if (problem is not null)
        {
            Log($"MSI-X capability at 0x{offset:x2} hidden: {problem}");
            return null;
        }
        if (count < size)
            Log($"MSI-X: the capability has {size} vectors, VFIO offers {count}; the guest sees {count}");
        var msix = new MsixTable(Config, (int)count, tableBar, tableOffset, pbaBar, pbaOffset, controller, _device.Name,
            passthrough: true, capabilityOffset: offset);
        Emulate(offset, 12);
        return msix;
    }

    // ---- configuration space ----

    public override void ConfigRead(int offset, Span<byte> data)
    {
        bool device = false;
        for (int i = 0; i < data.Length; i++)
            device |= !_emulated[offset + i];
        if (device)
            ReadDeviceConfig(offset, data);
        if (_msi is not null && _msi.TouchesPending(offset, data.Length))
            _msi.RefreshPending();
        for (int i = 0; i < data.Length; i++)
        {
            if (_emulated[offset + i])
                data[i] = Config.Get8(offset + i);
        }
    }

    public override void ConfigWrite(int offset, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < data.Length; i++)
        {
            if (_emulated[offset + i])
                Config.Write(offset + i, data.Slice(i, 1));
        }
        WriteDeviceConfig(offset, data);
        bool command = PciConfigSpace.TouchesCommand(offset, data.Length);
        if (command)
            ForwardCommand();
        bool interrupts = command;
        if (Msix is not null && Msix.TouchesCapability(offset, data.Length))
        {
            Msix.ControlWritten();
            interrupts = true;
        }
        if (_msi is not null && _msi.Touches(offset, data.Length))
        {
            _msi.Written();
            interrupts = true;
        }
        if (interrupts)
            UpdateInterruptMode();
    }

    private void ReadDeviceConfig(int offset, Span<byte> data)
    {
        if (offset + data.Length > _configRegionSize)
        {
            data.Clear(); // beyond a conventional device's 256 bytes: no extended capabilities
            return;
        }
        try
        {
            _device.ReadRegion(VfioRegionIndex.Config, (ulong)offset, data);
        }
        catch (Exception e)
        {
            data.Fill(0xFF);
            Error($"config read at 0x{offset:x3}", e);
        }
    }

    /// <summary>Forwards the bits of the write the device may take, one run of device-writable bytes at a time;
    /// a byte with only some bits writable is merged with what the device holds.</summary>
    private void WriteDeviceConfig(int offset, ReadOnlySpan<byte> data)
    {
        Span<byte> buffer = stackalloc byte[8];
        int i = 0;
        while (i < data.Length)
        {
            if (_emulated[offset + i] || _deviceWritable[offset + i] == 0)
            {
                i++;
                continue;
            }
            int start = i;
            while (i < data.Length && !_emulated[offset + i] && _deviceWritable[offset + i] != 0)
                i++;
            int at = offset + start, length = i - start;
            if (at + length > _configRegionSize)
                return;
            var merged = buffer[..Math.Min(length, buffer.Length)];
            length = merged.Length;
            try
            {
                _device.ReadRegion(VfioRegionIndex.Config, (ulong)at, merged);
                for (int k = 0; k < length; k++)
                {
                    byte mask = _deviceWritable[at + k];
                    merged[k] = (byte)((merged[k] & ~mask) | (data[start + k] & mask));
                }
                _device.WriteRegion(VfioRegionIndex.Config, (ulong)at, merged);
            }
            catch (Exception e)
            {
                Error($"config write at 0x{at:x3}", e);
            }
        }
    }

    /// <summary>Gives the device the guest's memory, bus-master and INTx-disable bits (it must see bus master to DMA).</summary>
    private void ForwardCommand()
    {
        Span<byte> command = stackalloc byte[2];
        try
        {
            _device.ReadRegion(VfioRegionIndex.Config, PciConfigSpace.Command, command);
            ushort value = BinaryPrimitives.ReadUInt16LittleEndian(command);
            ushort wanted = (ushort)((value & ~ForwardedCommandBits) | (Config.CommandRegister & ForwardedCommandBits));
            if (wanted == value)
                return;
            BinaryPrimitives.WriteUInt16LittleEndian(command, wanted);
            _device.WriteRegion(VfioRegionIndex.Config, PciConfigSpace.Command, command);
        }
        catch (Exception e)
        {
            Error("command register update", e);
        }
    }

    // ---- interrupts ----

    private InterruptMode WantedMode() =>
        Msix?.Enabled == true ? InterruptMode.Msix
        : _msi?.Enabled == true ? InterruptMode.Msi
        : _intxLine is not null && !Config.InterruptDisabled ? InterruptMode.Intx
        : InterruptMode.None;

    /// <summary>Moves VFIO to the interrupt mode the guest's registers ask for. VFIO takes one mode at a time, so the
    /// old one is disabled first (vfio-pci refuses MSI while INTx is on).</summary>
    private void UpdateInterruptMode()
    {
        var wanted = WantedMode();
        if (wanted == _mode)
            return;
        LeaveMode();
        try
        {
            switch (wanted)
            {
                case InterruptMode.Msix:
                    _device.SetIrqEventFds(VfioIrqIndex.Msix, 0, _msixFds);
                    break;
                case InterruptMode.Msi:
                    Span<int> fds = stackalloc int[32];
                    int count = _msi!.EnabledVectors;
                    for (int i = 0; i < count; i++)
                        fds[i] = _msi.Vector(i).EventFd.Fd;
                    _device.SetIrqEventFds(VfioIrqIndex.Msi, 0, fds[..count]);
                    break;
                case InterruptMode.Intx:
                    // KVM's side first, so the first assertion finds its irqfd; the unmask fd needs INTx enabled.
                    _intxAttachment = _intxLine!.Attach(_intxTrigger!, _intxResample!);
                    Span<int> trigger = [_intxTrigger!.Fd];
                    _device.SetIrqEventFds(VfioIrqIndex.Intx, 0, trigger);
                    _device.SetIntxUnmaskEventFd(_intxResample!.Fd);
                    break;
            }
            _mode = wanted;
        }
        catch (Exception e)
        {
            Error($"enabling {wanted}", e);
            _intxAttachment?.Dispose();
            _intxAttachment = null;
        }
    }

    private void LeaveMode()
    {
        var mode = _mode;
        _mode = InterruptMode.None;
        try
        {
            switch (mode)
            {
                case InterruptMode.Msix:
                    _device.DisableIrqs(VfioIrqIndex.Msix);
                    for (int i = 0; i < Msix!.Count; i++)
                        Msix.Vector(i).EventFd.TryRead(out _); // a signal from before must not fire after re-enable
                    break;
                case InterruptMode.Msi:
                    _device.DisableIrqs(VfioIrqIndex.Msi);
                    for (int i = 0; i < _msi!.VectorCount; i++)
                        _msi.Vector(i).EventFd.TryRead(out _);
                    break;
                case InterruptMode.Intx:
                    _device.DisableIrqs(VfioIrqIndex.Intx);
                    break;
            }
        }
        catch (Exception e)
        {
            Error($"disabling {mode}", e);
        }
        if (mode == InterruptMode.Intx)
        {
            _intxAttachment?.Dispose();
            _intxAttachment = null;
            _intxTrigger!.TryRead(out _);
            _intxResample!.TryRead(out _);
        }
    }

    // ---- BARs ----

    /// <summary>One memory BAR: the pieces of its mmappable areas that go into the guest (page aligned, MSI-X table
    /// and PBA pages left out so they trap), the host mappings of those areas (made once, kept), and the guest slots
    /// of the current placement.</summary>
    private sealed class BarMapping(PciBar bar, VfioRegionInfo info)
    {
        public PciBar Bar { get; } = bar;
        public VfioRegionInfo Info { get; } = info;
        public List<(int Area, ulong Offset, ulong Size)> Pieces { get; } = [];
        public IVfioMapping?[] AreaMappings { get; } = new IVfioMapping?[info.MmapAreas.Count];
        public bool[] AreaFailed { get; } = new bool[info.MmapAreas.Count];
        public List<IDisposable> Slots { get; } = [];
    }

    private static ulong PageSize => (ulong)Environment.SystemPageSize;

    private static ulong AlignUp(ulong value) => (value + PageSize - 1) & ~(PageSize - 1);
    private static ulong AlignDown(ulong value) => value & ~(PageSize - 1);

    /// <summary>The region part an area can map: page-aligned inward and inside the region.</summary>
    private static (ulong Start, ulong End) AreaRange(BarMapping b, int area)
    {
        var a = b.Info.MmapAreas[area];
        ulong end = Math.Min(a.End, b.Info.Size);
        return (AlignUp(a.Offset), AlignDown(end));
    }

    private void PlanBarMappings()
    {
        foreach (var b in _bars)
        {
            if (b is null || (b.Info.Flags & VfioRegionFlags.Mmap) == 0)
                continue;
            var holes = new List<(ulong Start, ulong End)>();
            if (Msix is not null && Msix.Bar == b.Bar.Index)
                holes.Add((AlignDown(Msix.TableOffset), AlignUp(Msix.TableOffset + (ulong)Msix.TableLength)));
            if (Msix is not null && Msix.PbaBar == b.Bar.Index)
                holes.Add((AlignDown(Msix.PbaOffset), AlignUp(Msix.PbaOffset + (ulong)Msix.PbaLength)));
            for (int area = 0; area < b.Info.MmapAreas.Count; area++)
            {
                var (start, end) = AreaRange(b, area);
                if (start >= end)
                    continue;
                var pieces = new List<(ulong Start, ulong End)> { (start, end) };
                foreach (var hole in holes)
                {
                    var cut = new List<(ulong Start, ulong End)>();
                    foreach (var p in pieces)
                    {
                        if (hole.End <= p.Start || hole.Start >= p.End)
                        {
                            cut.Add(p);
                            continue;
                        }
                        if (p.Start < hole.Start)
                            cut.Add((p.Start, hole.Start));
                        if (hole.End < p.End)
                            cut.Add((hole.End, p.End));
                    }
                    pieces = cut;
                }
                foreach (var p in pieces)
                    b.Pieces.Add((area, p.Start, p.End - p.Start));
            }
        }
    }

    /// <summary>Maps the BAR's pieces at its new guest address (or only removes the old slots when it decodes nowhere).
    /// Called under the root bus's config lock.</summary>
    public override void BarMapped(int bar, ulong? address)
    {
        if ((uint)bar >= 6 || _bars[bar] is not { } b || _disposed)
            return;
        RemoveSlots(b);
        if (address is not ulong guestBase)
            return;
        foreach (var (area, offset, size) in b.Pieces)
        {
            var mapping = AreaMapping(b, area);
            if (mapping is null)
                continue; // accesses exit and go through ReadRegion/WriteRegion
            var (areaStart, _) = AreaRange(b, area);
            try
            {
                b.Slots.Add(_mapper.Map(guestBase + offset, size, mapping.HostAddress + (nint)(offset - areaStart),
                    $"{_device.Name} BAR{bar}+0x{offset:x}", mapping.FileDescriptor,
                    mapping.FileDescriptor < 0 ? 0 : mapping.FileOffset + (long)(offset - areaStart)));
            }
            catch (Exception e)
            {
                Error($"mapping BAR{bar}+0x{offset:x} (0x{size:x} bytes) at guest 0x{guestBase + offset:x}; accesses there will exit", e);
            }
        }
    }

    private IVfioMapping? AreaMapping(BarMapping b, int area)
    {
        if (b.AreaMappings[area] is { } existing)
            return existing;
        if (b.AreaFailed[area])
            return null;
        var (start, end) = AreaRange(b, area);
        try
        {
            return b.AreaMappings[area] = _device.MapRegion(b.Bar.Index, start, end - start);
        }
        catch (Exception e)
        {
            b.AreaFailed[area] = true;
            Error($"mmap of BAR{b.Bar.Index} [0x{start:x}, 0x{end:x}); accesses there will exit", e);
            return null;
        }
    }

    private static void RemoveSlots(BarMapping b)
    {
        foreach (var slot in b.Slots)
            slot.Dispose();
        b.Slots.Clear();
    }

    public override void BarRead(int bar, ulong offset, Span<byte> data)
    {
        if (bar == PciConfigSpace.RomBarIndex)
        {
            if (offset + (ulong)data.Length > _romRegionSize)
                data.Fill(0xFF); // the BAR was rounded up to a power of two; nothing decodes past the ROM
            else
                ReadRegion(VfioRegionIndex.Rom, offset, data);
            return;
        }
        if (Msix is { } msix)
        {
            if (bar == msix.Bar && offset >= msix.TableOffset && offset < msix.TableOffset + (ulong)msix.TableLength)
            {
                msix.ReadTable(offset - msix.TableOffset, data);
                return;
            }
            if (bar == msix.PbaBar && offset >= msix.PbaOffset && offset < msix.PbaOffset + (ulong)msix.PbaLength)
            {
                msix.ReadPba(offset - msix.PbaOffset, data);
                return;
            }
        }
        if ((uint)bar < 6 && _bars[bar] is not null)
            ReadRegion(bar, offset, data);
        else
            data.Fill(0xFF);
    }

    public override void BarWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
    {
        if (bar == PciConfigSpace.RomBarIndex)
            return; // read-only
        if (Msix is { } msix)
        {
            if (bar == msix.Bar && offset >= msix.TableOffset && offset < msix.TableOffset + (ulong)msix.TableLength)
            {
                msix.WriteTable(offset - msix.TableOffset, data);
                return;
            }
            if (bar == msix.PbaBar && offset >= msix.PbaOffset && offset < msix.PbaOffset + (ulong)msix.PbaLength)
                return; // the PBA is read-only
        }
        if ((uint)bar >= 6 || _bars[bar] is null)
            return;
        try
        {
            _device.WriteRegion(bar, offset, data);
        }
        catch (Exception e)
        {
            Error($"BAR{bar} write at 0x{offset:x}", e);
        }
    }

    private void ReadRegion(int region, ulong offset, Span<byte> data)
    {
        try
        {
            _device.ReadRegion(region, offset, data);
        }
        catch (Exception e)
        {
            data.Fill(0xFF); // what a read of a device that stopped answering returns on real hardware
            Error($"{(region == VfioRegionIndex.Rom ? "ROM" : $"BAR{region}")} read at 0x{offset:x}", e);
        }
    }

    // ---- diagnostics and teardown ----

    private void Log(string message) => _log?.Invoke($"{_device.Name}: {message}");

    /// <summary>Logs a failed device access; the guest goes on (it reads all-ones). After
    /// <see cref="MaxLoggedErrors"/> the rest are only counted, so a guest polling a dead device cannot flood the log.</summary>
    private void Error(string what, Exception e)
    {
        int n = Interlocked.Increment(ref _errors);
        if (n <= MaxLoggedErrors)
            Log($"{what} failed: {e.Message}{(n == MaxLoggedErrors ? " (further device errors are not logged)" : "")}");
    }

    /// <summary>Device accesses that failed so far.</summary>
    public int ErrorCount => Volatile.Read(ref _errors);

    public void Dispose()
    {
        if (_disposed)
            return;
        _disposed = true;
        LeaveMode();
        foreach (var b in _bars)
        {
            if (b is null)
                continue;
            RemoveSlots(b);
            foreach (var m in b.AreaMappings)
                m?.Dispose();
        }
        _intxTrigger?.Dispose();
        _intxResample?.Dispose();
        _device.Dispose();
    }
}
