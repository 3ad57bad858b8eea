using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Devices.Virtio;

/// <summary>Registers guest writes to an address as eventfd signals in the kernel (KVM_IOEVENTFD), so a queue
/// notification costs the vCPU no exit to userspace and no wait for device work.</summary>
public interface IIoEventRegistrar
{
    void Register(EventFd eventFd, ulong address, uint length);
    void Unregister(EventFd eventFd, ulong address, uint length);
}

/// <summary>The virtio-over-PCI transport, modern only (virtio 1.2 §4.1): a non-transitional function
/// (device ID 0x1040 + type, revision 1) with one 32-bit memory BAR holding the common, ISR, device and
/// notification structures and the MSI-X table and PBA, announced by vendor capabilities. Interrupts go
/// through MSI-X when the driver enables it, else INTx (the ISR status register).</summary>
public sealed class VirtioPciFunction : PciFunction, IVirtioInterrupts, IDisposable
{
    public const int BarIndex = 0;
    public const uint BarSize = 0x8000;
    public const uint CommonOffset = 0x0000, CommonLength = 0x3C;
    public const uint IsrOffset = 0x1000, IsrLength = 4;
    public const uint DeviceOffset = 0x2000, DeviceMaxLength = 0x1000;
    public const uint NotifyOffset = 0x3000, NotifyMultiplier = 4;
    public const uint MsixTableOffset = 0x4000, MsixPbaOffset = 0x6000;
    public const ushort NoVector = 0xFFFF;

    private const byte CapCommon = 1, CapNotify = 2, CapIsr = 3, CapDevice = 4, CapPciCfg = 5;

    private readonly VirtioDevice _device;
    private readonly GuestMemory _memory;
    private readonly IIoEventRegistrar? _ioEvents;
    private readonly SplitQueue[] _queues;
    private readonly EventFd[] _kicks;
    private readonly Lock _lock = new();
    private readonly int _pciCfgCap;
    private IInterruptLine? _intx;
    private readonly Lock _intxLock = new();

    private uint _deviceFeatureSelect, _driverFeatureSelect;
    private ulong _driverFeatures;
    private ushort _configVector = NoVector;
    private byte _status;
    private byte _configGeneration;
    private ushort _queueSelect;
    private int _isr;
    private bool _active;
    private ulong? _notifyBase;

    public VirtioPciFunction(VirtioDevice device, GuestMemory memory, IMsiController msi, IIoEventRegistrar? ioEvents)
        : base(new PciConfigSpace(0x1AF4, (ushort)(0x1040 + (ushort)device.Type), device.PciClass.Class, device.PciClass.SubClass,
            revision: 1, subsystemVendorId: 0x1AF4, subsystemId: 0x40))
    {
        if (device.ConfigSize > DeviceMaxLength)
            throw new PciConfigException($"{device.Name}: {device.ConfigSize} bytes of device configuration do not fit");
        if (device.QueueCount is < 1 or > 64)
            throw new PciConfigException($"{device.Name}: {device.QueueCount} queues (1-64 supported)");
        _device = device;
        _memory = memory;
        _ioEvents = ioEvents;
        _queues = new SplitQueue[device.QueueCount];
        _kicks = new EventFd[device.QueueCount];
        for (int i = 0; i < _queues.Length; i++)
        {
            _queues[i] = new SplitQueue(memory, device.MaxQueueSize);
            _kicks[i] = new EventFd();
        }
        Config.AddBar(BarIndex, BarSize, PciBarKind.Memory32);
        Config.SetInterruptPin(1); // INTA#
        AddVirtioCap(CapCommon, CommonOffset, CommonLength);
        AddVirtioCap(CapNotify, NotifyOffset, NotifyMultiplier * (uint)_queues.Length, NotifyMultiplier);
        AddVirtioCap(CapIsr, IsrOffset, IsrLength);
        if (device.ConfigSize > 0)
            AddVirtioCap(CapDevice, DeviceOffset, (uint)device.ConfigSize);
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BAR through configuration space (bar, offset, length, data).
        _pciCfgCap = AddVirtioCap(CapPciCfg, 0, 0, extra: 0, writableWindow: true);
        Msix = new MsixTable(Config, _queues.Length + 1, BarIndex, MsixTableOffset, BarIndex, MsixPbaOffset, msi, device.Name,
            passthrough: device.SignalsVectorsDirectly, capabilityOffset: 0);
    }

    public override string Name => _device.Name;

    public VirtioDevice Device => _device;

    public MsixTable Msix { get; }

    public byte Status => _status;

    public IReadOnlyList<SplitQueue> Queues => _queues;

    /// <summary>Why the device last entered DEVICE_NEEDS_RESET, for diagnostics.</summary>
    public string? NeedsResetReason { get; private set; }

    /// <summary>Wires INTx (the level of INTA# of this function's slot).</summary>
    public void ConnectIntx(IInterruptLine line) => _intx = line;

    private int AddVirtioCap(byte type, uint offset, uint length, uint? extra = null, bool writableWindow = false)
    {
        // struct virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length.
        int bodyLength = 14 + (extra is null ? 0 : 4);
        Span<byte> body = stackalloc byte[bodyLength];
        body.Clear();
        body[0] = (byte)(bodyLength + 2);
        body[1] = type;
        body[2] = BarIndex;
        BinaryPrimitives.WriteUInt32LittleEndian(body[6..], offset);
        BinaryPrimitives.WriteUInt32LittleEndian(body[10..], length);
        if (extra is uint e)
            BinaryPrimitives.WriteUInt32LittleEndian(body[14..], type == CapNotify ? NotifyMultiplier : e);
        Span<byte> writable = stackalloc byte[bodyLength];
        writable.Clear();
        if (writableWindow)
        {
            writable[2] = 0xFF;                  // bar
            writable[6..10].Fill(0xFF);          // offset
            writable[10..14].Fill(0xFF);         // length
            writable[14..18].Fill(0xFF);         // pci_cfg_data
        }
        return Config.AddCapability(PciConfigSpace.CapabilityVendor, body, writable);
    }

    public override void ConfigRead(int offset, Span<byte> data)
    {
        if (InPciCfgData(offset, data.Length))
        {
            Span<byte> window = stackalloc byte[4];
            window.Fill(0xFF);
            if (PciCfgWindow(out ulong at, out int length) && length <= 4)
                BarRead(Config.Get8(_pciCfgCap + 4), at, window[..length]);
            window[(offset - (_pciCfgCap + 16))..][..data.Length].CopyTo(data);
            return;
        }
        base.ConfigRead(offset, data);
    }

    public override void ConfigWrite(int offset, ReadOnlySpan<byte> data)
    {
        if (InPciCfgData(offset, data.Length))
        {
            if (PciCfgWindow(out ulong at, out int length) && length == data.Length)
                BarWrite(Config.Get8(_pciCfgCap + 4), at, data);
            return;
        }
        base.ConfigWrite(offset, data);
        bool msix = Msix.TouchesCapability(offset, data.Length);
        if (msix)
            Msix.ControlWritten();
        // Clearing INTx disable re-asserts a pending interrupt; enabling MSI-X drops the line.
        if (msix || PciConfigSpace.TouchesCommand(offset, data.Length))
            UpdateIntx();
    }

    /// <summary>Drives INTx from the ISR: asserted while it is non-zero, unless the command register disables INTx
    /// or MSI-X replaces it. One place, under one lock, so a device thread raising an interrupt and a vCPU reading
    /// (and so clearing) the ISR cannot leave the line low with the ISR set.</summary>
    private void UpdateIntx()
    {
        if (_intx is null)
            return;
        lock (_intxLock)
            _intx.SetLevel(Volatile.Read(ref _isr) != 0 && !Config.InterruptDisabled && !Msix.Enabled);
    }

    private bool InPciCfgData(int offset, int length) => offset >= _pciCfgCap + 16 && offset + length <= _pciCfgCap + 20;

    private bool PciCfgWindow(out ulong offset, out int length)
    {
        offset = Config.Get32(_pciCfgCap + 8);
        length = (int)Math.Min(Config.Get32(_pciCfgCap + 12), 4u);
        return Config.Get8(_pciCfgCap + 4) == BarIndex && length is 1 or 2 or 4;
    }

    public override void BarRead(int bar, ulong offset, Span<byte> data)
    {
        if (bar != BarIndex)
        {
            data.Fill(0xFF);
            return;
        }
        if (offset < CommonOffset + CommonLength)
            ReadCommon((int)offset, data);
        else if (offset >= IsrOffset && offset < IsrOffset + IsrLength)
            ReadIsr(data);
        else if (offset >= DeviceOffset && offset + (ulong)data.Length <= DeviceOffset + (ulong)_device.ConfigSize)
            _device.ReadConfig((int)(offset - DeviceOffset), data);
        else if (offset >= MsixTableOffset && offset < MsixTableOffset + (ulong)Msix.TableLength)
            Msix.ReadTable(offset - MsixTableOffset, data);
        else if (offset >= MsixPbaOffset && offset < MsixPbaOffset + (ulong)Msix.PbaLength)
            Msix.ReadPba(offset - MsixPbaOffset, data);
        else
            data.Clear();
    }

    public override void BarWrite(int bar, ulong offset, ReadOnlySpan<byte> data)
    {
        if (bar != BarIndex)
            return;
        if (offset < CommonOffset + CommonLength)
            WriteCommon((int)offset, data);
        else if (offset >= NotifyOffset && offset < NotifyOffset + NotifyMultiplier * (ulong)_queues.Length)
        {
            // Only without an ioeventfd (or for a width it does not match) does a notification get here.
            _kicks[(offset - NotifyOffset) / NotifyMultiplier].Signal();
        }
        else if (offset >= DeviceOffset && offset + (ulong)data.Length <= DeviceOffset + (ulong)_device.ConfigSize)
            _device.WriteConfig((int)(offset - DeviceOffset), data);
        else if (offset >= MsixTableOffset && offset < MsixTableOffset + (ulong)Msix.TableLength)
            Msix.WriteTable(offset - MsixTableOffset, data);
    }

    public override void BarMapped(int bar, ulong? address)
    {
        if (bar != BarIndex || _ioEvents is null)
            return;
        lock (_lock)
        {
            if (_notifyBase is ulong old)
                ForEachNotify(old, _ioEvents.Unregister);
            _notifyBase = address is ulong a ? a + NotifyOffset : null;
            if (_notifyBase is ulong now)
                ForEachNotify(now, _ioEvents.Register);
        }
    }

    private void ForEachNotify(ulong notifyBase, Action<EventFd, ulong, uint> action)
    {
        for (int q = 0; q < _queues.Length; q++)
        {
            // Drivers write the 16-bit queue index; some use 32-bit accesses.
            action(_kicks[q], notifyBase + (ulong)q * NotifyMultiplier, 2);
            action(_kicks[q], notifyBase + (ulong)q * NotifyMultiplier, 4);
        }
    }

    private void ReadIsr(Span<byte> data)
    {
        int isr = Interlocked.Exchange(ref _isr, 0); // reading clears it and deasserts INTx
        UpdateIntx();
        data.Clear();
        data[0] = (byte)isr;
    }

    // ---- common configuration (struct virtio_pci_common_cfg) ----

    private void ComposeCommon(Span<byte> c)
    {
        c.Clear();
        ulong deviceFeatures = _device.OfferedFeatures;
        BinaryPrimitives.WriteUInt32LittleEndian(c[0x00..], _deviceFeatureSelect);
        BinaryPrimitives.WriteUInt32LittleEndian(c[0x04..], _deviceFeatureSelect switch
        {
            0 => (uint)deviceFeatures,
            1 => (uint)(deviceFeatures >> 32),
            _ => 0,
        });
        BinaryPrimitives.WriteUInt32LittleEndian(c[0x08..], _driverFeatureSelect);
        BinaryPrimitives.WriteUInt32LittleEndian(c[0x0C..], _driverFeatureSelect switch
        {
            0 => (uint)_driverFeatures,
            1 => (uint)(_driverFeatures >> 32),
            _ => 0,
        });
        BinaryPrimitives.WriteUInt16LittleEndian(c[0x10..], _configVector);
        BinaryPrimitives.WriteUInt16LittleEndian(c[0x12..], (ushort)_queues.Length);
        c[0x14] = _status;
        c[0x15] = _configGeneration;
        BinaryPrimitives.WriteUInt16LittleEndian(c[0x16..], _queueSelect);
        if (_queueSelect < _queues.Length)
        {
            var q = _queues[_queueSelect];
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x18..], q.Size);
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x1A..], q.MsixVector);
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x1C..], (ushort)(q.Enabled ? 1 : 0));
            BinaryPrimitives.WriteUInt16LittleEndian(c[0x1E..], _queueSelect); // queue_notify_off
            BinaryPrimitives.WriteUInt64LittleEndian(c[0x20..], q.DescriptorTable);
            BinaryPrimitives.WriteUInt64LittleEndian(c[0x28..], q.AvailRing);
            BinaryPrimitives.WriteUInt64LittleEndian(c[0x30..], q.UsedRing);
        }
        // queue_size reads 0 for a queue that does not exist: how drivers find the number of queues.
    }

    private void ReadCommon(int offset, Span<byte> data)
    {
        Span<byte> c = stackalloc byte[0x40];
        lock (_lock)
            ComposeCommon(c);
        if (offset + data.Length > c.Length)
        {
            data.Clear();
            return;
        }
        c.Slice(offset, data.Length).CopyTo(data);
    }

    private static bool Touches(int offset, int length, int field, int size) => offset < field + size && offset + length > field;

    private void WriteCommon(int offset, ReadOnlySpan<byte> data)
    {
        Span<byte> c = stackalloc byte[0x40];
        if (offset + data.Length > (int)CommonLength)
            return;
        VirtioDevice? activate = null, deactivate = null;
        bool reset = false, needsReset = false;
        lock (_lock)
        {
            ComposeCommon(c);
            data.CopyTo(c[offset..]);
            int n = data.Length;
            if (Touches(offset, n, 0x00, 4))
                _deviceFeatureSelect = BinaryPrimitives.ReadUInt32LittleEndian(c[0x00..]);
            if (Touches(offset, n, 0x08, 4))
                _driverFeatureSelect = BinaryPrimitives.ReadUInt32LittleEndian(c[0x08..]);
            if (Touches(offset, n, 0x0C, 4) && (_status & VirtioFeatures.StatusFeaturesOk) == 0)
            {
                ulong word = BinaryPrimitives.ReadUInt32LittleEndian(c[0x0C..]);
                if (_driverFeatureSelect == 0)
                    _driverFeatures = (_driverFeatures & ~0xFFFF_FFFFUL) | word;
                else if (_driverFeatureSelect == 1)
                    _driverFeatures = (_driverFeatures & 0xFFFF_FFFFUL) | (word << 32);
            }
            // A vector the MSI-X table does not have reads back as NO_VECTOR (§4.1.5.1.2): how drivers learn it failed.
            if (Touches(offset, n, 0x10, 2))
                _configVector = MappableVector(BinaryPrimitives.ReadUInt16LittleEndian(c[0x10..]));
            if (Touches(offset, n, 0x16, 2))
                _queueSelect = BinaryPrimitives.ReadUInt16LittleEndian(c[0x16..]);
            else if (_queueSelect < _queues.Length && !_active)
            {
                var q = _queues[_queueSelect];
                if (Touches(offset, n, 0x18, 2))
                    q.Size = BinaryPrimitives.ReadUInt16LittleEndian(c[0x18..]);
                if (Touches(offset, n, 0x20, 8))
                    q.DescriptorTable = BinaryPrimitives.ReadUInt64LittleEndian(c[0x20..]);
                if (Touches(offset, n, 0x28, 8))
                    q.AvailRing = BinaryPrimitives.ReadUInt64LittleEndian(c[0x28..]);
                if (Touches(offset, n, 0x30, 8))
                    q.UsedRing = BinaryPrimitives.ReadUInt64LittleEndian(c[0x30..]);
                if (Touches(offset, n, 0x1C, 2) && BinaryPrimitives.ReadUInt16LittleEndian(c[0x1C..]) == 1)
                    q.Enabled = true;
            }
            if (_queueSelect < _queues.Length && Touches(offset, n, 0x1A, 2))
                _queues[_queueSelect].MsixVector = MappableVector(BinaryPrimitives.ReadUInt16LittleEndian(c[0x1A..]));
            if (Touches(offset, n, 0x14, 1))
                WriteStatus(c[0x14], ref activate, ref deactivate, ref reset, ref needsReset);
        }
        // Outside the lock: a device stops its worker, which may be interrupting the driver right now. Only then
        // are the queues reset, so a worker never completes into a ring whose addresses were just cleared.
        deactivate?.Deactivate();
        if (reset)
        {
            lock (_lock)
                ResetLocked();
        }
        if (needsReset)
            ConfigInterrupt();
        if (activate is not null)
            Activate();
    }

    private ushort MappableVector(ushort vector) => vector < Msix.Count ? vector : NoVector;

    private void WriteStatus(byte value, ref VirtioDevice? activate, ref VirtioDevice? deactivate, ref bool reset, ref bool needsReset)
    {
        if (value == 0)
        {
            if (_active)
                deactivate = _device;
            _active = false;
            reset = true; // after Deactivate, outside the lock
            return;
        }
        // FEATURES_OK only for a subset of what we offered that includes VERSION_1 (modern devices only).
        if ((value & VirtioFeatures.StatusFeaturesOk) != 0 && (_status & VirtioFeatures.StatusFeaturesOk) == 0)
        {
            ulong offered = _device.OfferedFeatures;
            if ((_driverFeatures & ~offered) != 0 || !VirtioFeatures.Has(_driverFeatures, VirtioFeatures.Version1))
                value &= unchecked((byte)~VirtioFeatures.StatusFeaturesOk);
        }
        byte keep = (byte)(_status & VirtioFeatures.StatusNeedsReset);
        _status = (byte)(value | keep);
        if ((value & VirtioFeatures.StatusDriverOk) != 0 && !_active && (_status & VirtioFeatures.StatusFeaturesOk) != 0)
        {
            foreach (var q in _queues)
            {
                q.EventIdx = VirtioFeatures.Has(_driverFeatures, VirtioFeatures.RingEventIdx);
                q.IndirectDescriptors = VirtioFeatures.Has(_driverFeatures, VirtioFeatures.RingIndirectDesc);
                if (q.Enabled && q.Validate() is string problem)
                {
                    q.Enabled = false;
                    NeedsResetReason = problem;
                    _status |= VirtioFeatures.StatusNeedsReset;
                    needsReset = true;
                }
            }
            _active = true;
            activate = _device;
        }
    }

    private void Activate()
    {
        var context = new VirtioContext(_memory, _driverFeatures, _queues, _kicks, this);
        _device.Activate(context);
    }

    private void ResetLocked()
    {
        _status = 0;
        _driverFeatures = 0;
        _deviceFeatureSelect = _driverFeatureSelect = 0;
        _configVector = NoVector;
        _queueSelect = 0;
        Interlocked.Exchange(ref _isr, 0);
        UpdateIntx();
        foreach (var q in _queues)
            q.Reset();
        foreach (var k in _kicks)
            k.TryRead(out _);
        NeedsResetReason = null;
        _configGeneration++;
    }

    // ---- interrupts (called from device threads) ----

    public void QueueInterrupt(SplitQueue queue) => Interrupt(queue.MsixVector, isrBit: 1);

    /// <summary>With MSI-X on and a vector assigned, for a device whose vectors are signalled directly: the
    /// vector's irqfd, so a back-end's signal is the interrupt. Otherwise null (the device relays through
    /// <see cref="QueueInterrupt"/>).</summary>
    public EventFd? QueueIrqFd(SplitQueue queue) =>
        Msix.Passthrough && Msix.Enabled && queue.MsixVector < Msix.Count ? Msix.Vector(queue.MsixVector).EventFd : null;

    public void ConfigInterrupt()
    {
        lock (_lock)
            _configGeneration++;
        Interrupt(_configVector, isrBit: 2);
    }

    public void NeedsReset(string why)
    {
        lock (_lock)
        {
            NeedsResetReason = why;
            _status |= VirtioFeatures.StatusNeedsReset;
        }
        ConfigInterrupt();
    }

    private void Interrupt(ushort vector, int isrBit)
    {
        if (Msix.Enabled)
        {
            Msix.Signal(vector); // NO_VECTOR (0xFFFF) is out of range: no interrupt, as the spec says
            return;
        }
        Interlocked.Or(ref _isr, isrBit);
        UpdateIntx();
    }

    public void Dispose()
    {
        bool wasActive;
        lock (_lock)
        {
            wasActive = _active;
            _active = false;
        }
        if (wasActive)
            _device.Deactivate();
        _device.Dispose();
        foreach (var k in _kicks)
            k.Dispose();
    }
}
