using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Devices.Virtio;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

/// <summary>The virtio-pci modern transport driven the way a guest driver does: configuration space through ECAM,
/// the common/ISR/notify/device structures and the MSI-X table through the BAR window on the root bus.</summary>
public sealed class VirtioPciFunctionTests : IDisposable
{
    private const ulong DeviceFeatureBit3 = 1UL << 3, DeviceFeatureBit35 = 1UL << 35;
    private const ulong Version1 = 1UL << VirtioFeatures.Version1;
    private const ulong EventIdx = 1UL << VirtioFeatures.RingEventIdx, IndirectDesc = 1UL << VirtioFeatures.RingIndirectDesc;
    private const byte Ack = VirtioFeatures.StatusAcknowledge, Driver = VirtioFeatures.StatusDriver,
        FeaturesOk = VirtioFeatures.StatusFeaturesOk, DriverOk = VirtioFeatures.StatusDriverOk;

    // struct virtio_pci_common_cfg
    private const int DeviceFeatureSelect = 0x00, DeviceFeature = 0x04, DriverFeatureSelect = 0x08, DriverFeature = 0x0C,
        ConfigMsixVector = 0x10, NumQueues = 0x12, DeviceStatus = 0x14, ConfigGeneration = 0x15, QueueSelect = 0x16,
        QueueSize = 0x18, QueueMsixVector = 0x1A, QueueEnable = 0x1C, QueueNotifyOff = 0x1E, QueueDesc = 0x20,
        QueueDriver = 0x28, QueueDevice = 0x30;

    /// <summary>A virtio device with two queues that records what the transport asks of it.</summary>
    private sealed class FakeDevice : VirtioDevice
    {
        public readonly byte[] ConfigBytes = [1, 2, 3, 4, 5, 6, 7, 8];
        public List<VirtioContext> Activations { get; } = [];
        public int Deactivations { get; private set; }
        public bool Disposed { get; private set; }

        /// <summary>Run inside Deactivate, as a worker finishing its in-flight request before it stops.</summary>
        public Action? OnDeactivate { get; set; }

        public override VirtioDeviceType Type => VirtioDeviceType.Entropy;
        public override string Name => "virtio-fake";
        public override (byte Class, byte SubClass) PciClass => (0xFF, 0x00);
        public override ulong DeviceFeatures => DeviceFeatureBit3 | DeviceFeatureBit35;
        public override int QueueCount => 2;
        public override ushort MaxQueueSize => 16;
        public override int ConfigSize => ConfigBytes.Length;

        public override void ReadConfig(int offset, Span<byte> data) => ConfigBytes.AsSpan(offset, data.Length).CopyTo(data);

        public override void WriteConfig(int offset, ReadOnlySpan<byte> data) => data.CopyTo(ConfigBytes.AsSpan(offset));

        public override void Activate(VirtioContext context) => Activations.Add(context);

        public override void Deactivate()
        {
            Deactivations++;
            OnDeactivate?.Invoke();
        }

        public override void Dispose()
        {
            Disposed = true;
            base.Dispose();
        }
    }

    private readonly GuestMemory _memory = GuestMemory.Create(16 * MemoryLayout.MiB);
    private readonly PciRootBus _root = new(4 * MemoryLayout.GiB, 64 * MemoryLayout.GiB);
    private readonly RecordingMsiController _msi = new();
    private readonly RecordingIoEventRegistrar _ioEvents = new();
    private readonly RecordingInterruptLine _intx = new();
    private readonly FakeDevice _device = new();
    private readonly VirtioPciFunction _function;
    private readonly int _slot;

    public VirtioPciFunctionTests()
    {
        _function = new VirtioPciFunction(_device, _memory, _msi, _ioEvents);
        _function.ConnectIntx(_intx);
        _slot = _root.Add(_function);
    }

    public void Dispose()
    {
        _function.Dispose();
        _memory.Dispose();
    }

    private ulong Bar => _function.Config.BarAddress(VirtioPciFunction.BarIndex);

    // ---- configuration space (ECAM) ----

    private uint CfgRead(int register, int width = 4)
    {
        Span<byte> b = stackalloc byte[4];
        b.Clear();
        _root.Ecam.Read(((ulong)(uint)_slot << 15) | (uint)register, b[..width]);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void CfgWrite(int register, uint value, int width = 4)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _root.Ecam.Write(((ulong)(uint)_slot << 15) | (uint)register, b[..width]);
    }

    private void EnableMemoryDecode(bool on = true) =>
        CfgWrite(PciConfigSpace.Command, on ? (uint)(PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster) : 0, 2);

    /// <summary>The offsets of the vendor capabilities, by cfg_type.</summary>
    private Dictionary<int, int> VirtioCaps()
    {
        var caps = new Dictionary<int, int>();
        for (int at = (int)CfgRead(PciConfigSpace.CapabilitiesPointer, 1); at != 0; at = (int)CfgRead(at + 1, 1))
        {
            if (CfgRead(at, 1) == PciConfigSpace.CapabilityVendor)
                caps.Add((int)CfgRead(at + 3, 1), at);
        }
        return caps;
    }

    // ---- the BAR (through the root bus's window, as the guest's MMIO would go) ----

    private uint BarRead(uint offset, int width = 4)
    {
        Span<byte> b = stackalloc byte[8];
        b.Clear();
        _root.Mmio32Window.Read(Bar + offset - MemoryLayout.PciMmio32Start, b[..width]);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void BarWrite(uint offset, uint value, int width = 4)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _root.Mmio32Window.Write(Bar + offset - MemoryLayout.PciMmio32Start, b[..width]);
    }

    private byte Status => (byte)BarRead(DeviceStatus, 1);

    private void WriteStatus(byte status) => BarWrite(DeviceStatus, status, 1);

    /// <summary>ACKNOWLEDGE, DRIVER, the feature words, FEATURES_OK; returns the status read back.</summary>
    private byte Negotiate(ulong features)
    {
        WriteStatus(Ack);
        WriteStatus(Ack | Driver);
        BarWrite(DriverFeatureSelect, 0);
        BarWrite(DriverFeature, (uint)features);
        BarWrite(DriverFeatureSelect, 1);
        BarWrite(DriverFeature, (uint)(features >> 32));
        WriteStatus(Ack | Driver | FeaturesOk);
        return Status;
    }

    private void SetupQueue(int queue, VirtqueueBuilder vq, ushort? msixVector = null)
    {
        BarWrite(QueueSelect, (uint)queue, 2);
        BarWrite(QueueSize, vq.Size, 2);
        // 64-bit fields written as two 32-bit halves, low first, as Linux's vp_iowrite64_twopart does.
        BarWrite(QueueDesc, (uint)vq.DescriptorTable);
        BarWrite(QueueDesc + 4, (uint)(vq.DescriptorTable >> 32));
        BarWrite(QueueDriver, (uint)vq.AvailRing);
        BarWrite(QueueDriver + 4, (uint)(vq.AvailRing >> 32));
        BarWrite(QueueDevice, (uint)vq.UsedRing);
        BarWrite(QueueDevice + 4, (uint)(vq.UsedRing >> 32));
        if (msixVector is ushort v)
            BarWrite(QueueMsixVector, v, 2);
        BarWrite(QueueEnable, 1, 2);
    }

    /// <summary>A driver bringing the device up with queue 0 on <paramref name="vq"/>; returns the device's context.</summary>
    private VirtioContext BringUp(VirtqueueBuilder vq, ulong features = Version1, ushort? queueVector = null)
    {
        EnableMemoryDecode();
        Assert.Equal(Ack | Driver | FeaturesOk, Negotiate(features));
        SetupQueue(0, vq, queueVector);
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        return Assert.Single(_device.Activations);
    }

    // ---- identity and capabilities ----

    [Fact]
    public void It_is_a_modern_virtio_function_with_device_ID_0x1040_plus_type_and_revision_1()
    {
        Assert.Equal(0x1044_1AF4u, CfgRead(0x00));                // vendor 0x1AF4, device 0x1040 + 4 (entropy)
        Assert.Equal(1u, CfgRead(PciConfigSpace.RevisionId, 1));
        Assert.Equal(0xFF00u, CfgRead(PciConfigSpace.SubClass, 2)); // class FF, subclass 00
        Assert.Equal(0x0040_1AF4u, CfgRead(PciConfigSpace.SubsystemVendorId));
        Assert.Equal(1u, CfgRead(PciConfigSpace.InterruptPin, 1));
        Assert.Equal("virtio-fake", _function.Name);
        Assert.Same(_device, _function.Device);
        var bar = Assert.Single(_function.Config.Bars);
        Assert.Equal((0, (ulong)VirtioPciFunction.BarSize, PciBarKind.Memory32), (bar.Index, bar.Size, bar.Kind));
    }

    [Fact]
    public void The_capability_chain_announces_every_structure_in_BAR_0()
    {
        var caps = VirtioCaps();
        Assert.Equal([1, 2, 3, 4, 5], caps.Keys.Order());
        // (cap_len, bar, offset, length) of each; virtio 1.2 §4.1.4.
        (uint Len, uint Bar, uint Offset, uint Length) Cap(int type)
        {
            int at = caps[type];
            return (CfgRead(at + 2, 1), CfgRead(at + 4, 1), CfgRead(at + 8), CfgRead(at + 12));
        }
        Assert.Equal((16u, 0u, 0x0000u, 0x3Cu), Cap(1));  // common
        Assert.Equal((20u, 0u, 0x3000u, 8u), Cap(2));     // notify: 2 queues x multiplier 4
        Assert.Equal(4u, CfgRead(caps[2] + 16));          // notify_off_multiplier
        Assert.Equal((16u, 0u, 0x1000u, 4u), Cap(3));     // ISR
        Assert.Equal((16u, 0u, 0x2000u, 8u), Cap(4));     // device-specific: the device's 8 bytes
        Assert.Equal((20u, 0u, 0u, 0u), Cap(5));          // PCI configuration access

        int msix = _function.Config.FindCapability(PciConfigSpace.CapabilityMsix);
        Assert.NotEqual(0, msix);
        Assert.Equal(2u, CfgRead(msix + 2, 2));           // 3 vectors: one per queue and one for configuration
        Assert.Equal(0x4000u, CfgRead(msix + 4));         // table at 0x4000 of BAR 0
        Assert.Equal(0x6000u, CfgRead(msix + 8));         // PBA at 0x6000 of BAR 0
    }

    // ---- feature negotiation ----

    [Fact]
    public void Device_features_offer_the_device_bits_and_the_transport_bits()
    {
        EnableMemoryDecode();
        BarWrite(DeviceFeatureSelect, 0);
        Assert.Equal((uint)(DeviceFeatureBit3 | EventIdx | IndirectDesc), BarRead(DeviceFeature));
        BarWrite(DeviceFeatureSelect, 1);
        Assert.Equal(1u, BarRead(DeviceFeatureSelect));
        Assert.Equal((uint)((Version1 | DeviceFeatureBit35) >> 32), BarRead(DeviceFeature));
        BarWrite(DeviceFeatureSelect, 2);
        Assert.Equal(0u, BarRead(DeviceFeature));
        Assert.Equal(2u, BarRead(NumQueues, 2));
    }

    [Fact]
    public void FEATURES_OK_is_refused_without_VERSION_1()
    {
        EnableMemoryDecode();
        Assert.Equal(Ack | Driver, Negotiate(DeviceFeatureBit3 | EventIdx));
    }

    [Fact]
    public void FEATURES_OK_is_refused_with_a_bit_that_was_not_offered()
    {
        EnableMemoryDecode();
        Assert.Equal(Ack | Driver, Negotiate(Version1 | (1UL << 1)));
        Assert.Equal(Ack | Driver, Negotiate(Version1 | (1UL << 40)));
    }

    [Fact]
    public void FEATURES_OK_is_accepted_for_a_subset_with_VERSION_1_and_freezes_the_features()
    {
        EnableMemoryDecode();
        Assert.Equal(Ack | Driver | FeaturesOk, Negotiate(Version1 | DeviceFeatureBit35 | EventIdx));
        BarWrite(DriverFeatureSelect, 0);
        Assert.Equal((uint)EventIdx, BarRead(DriverFeature));
        BarWrite(DriverFeature, 0xFFFF_FFFF); // too late
        Assert.Equal((uint)EventIdx, BarRead(DriverFeature));
        BarWrite(DriverFeatureSelect, 1);
        Assert.Equal((uint)((Version1 | DeviceFeatureBit35) >> 32), BarRead(DriverFeature));
    }

    // ---- queues ----

    [Fact]
    public void Queues_are_set_up_through_common_configuration()
    {
        EnableMemoryDecode();
        Assert.Equal(16u, BarRead(QueueSize, 2)); // queue 0 offers its maximum
        var vq = new VirtqueueBuilder(_memory, 8, ringBase: 0x1_0000);
        SetupQueue(1, vq);
        BarWrite(QueueDesc, 0x1234_5000); // queue 1 again, one half only
        Assert.Equal(1u, BarRead(QueueSelect, 2));
        Assert.Equal(8u, BarRead(QueueSize, 2));
        Assert.Equal(1u, BarRead(QueueEnable, 2));
        Assert.Equal(1u, BarRead(QueueNotifyOff, 2));
        Assert.Equal(0x1234_5000u, BarRead(QueueDesc));
        Assert.Equal(0u, BarRead(QueueDesc + 4));
        Assert.Equal((uint)vq.AvailRing, BarRead(QueueDriver));
        Assert.Equal((uint)vq.UsedRing, BarRead(QueueDevice));
        var q = _function.Queues[1];
        Assert.Equal((ushort)8, q.Size);
        Assert.Equal(0x1234_5000UL, q.DescriptorTable);
        Assert.True(q.Enabled);
        Assert.False(_function.Queues[0].Enabled);

        // Addresses above 4 GiB: the high halves land too.
        BarWrite(QueueDriver + 4, 0x1);
        Assert.Equal(0x1_0000_0000UL | vq.AvailRing, q.AvailRing);
        Span<byte> eight = stackalloc byte[8];
        _root.Mmio32Window.Read(Bar + QueueDriver - MemoryLayout.PciMmio32Start, eight);
        Assert.Equal(0x1_0000_0000UL | vq.AvailRing, BinaryPrimitives.ReadUInt64LittleEndian(eight));
    }

    [Fact]
    public void A_queue_that_does_not_exist_has_size_0_and_ignores_writes()
    {
        EnableMemoryDecode();
        BarWrite(QueueSelect, 2, 2);
        Assert.Equal(0u, BarRead(QueueSize, 2));
        BarWrite(QueueSize, 8, 2);
        BarWrite(QueueDesc, 0x10000);
        BarWrite(QueueEnable, 1, 2);
        BarWrite(QueueMsixVector, 0, 2);
        Assert.Equal(0u, BarRead(QueueSize, 2));
        Assert.Equal(0u, BarRead(QueueDesc));
        Assert.Equal(0u, BarRead(QueueEnable, 2));
        BarWrite(QueueSelect, 0xFFFF, 2);
        Assert.Equal(0u, BarRead(QueueSize, 2));
    }

    [Fact]
    public void DRIVER_OK_activates_the_device_with_the_negotiated_features_and_queues()
    {
        var vq = new VirtqueueBuilder(_memory, 8);
        var context = BringUp(vq, Version1 | EventIdx | IndirectDesc);
        Assert.Equal(Ack | Driver | FeaturesOk | DriverOk, Status);
        Assert.Same(_memory, context.Memory);
        Assert.Equal(Version1 | EventIdx | IndirectDesc, context.Features);
        Assert.True(context.Negotiated(VirtioFeatures.RingEventIdx));
        Assert.Equal(2, context.Queues.Count);
        Assert.Equal(2, context.Kicks.Count);
        var q = context.Queues[0];
        Assert.True(q.Enabled);
        Assert.True(q.EventIdx);
        Assert.True(q.IndirectDescriptors);
        Assert.Equal(vq.UsedRing, q.UsedRing);
        Assert.False(context.Queues[1].Enabled);

        // The driver's ring works end to end through the device's context.
        ushort head = vq.AddChain([16], [32]);
        Assert.Equal(PopResult.Chain, q.Pop(out var chain));
        Assert.Equal(head, chain.Head);

        // Queue registers are frozen while the device runs; a second DRIVER_OK write does not activate again.
        BarWrite(QueueSelect, 0, 2);
        BarWrite(QueueSize, 4, 2);
        Assert.Equal((ushort)8, q.Size);
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        Assert.Single(_device.Activations);
    }

    [Fact]
    public void DRIVER_OK_without_FEATURES_OK_does_not_activate()
    {
        EnableMemoryDecode();
        Negotiate(DeviceFeatureBit3); // refused: no VERSION_1
        WriteStatus(Ack | Driver | DriverOk);
        Assert.Empty(_device.Activations);
    }

    [Fact]
    public void Writing_status_0_deactivates_and_resets_the_device()
    {
        var vq = new VirtqueueBuilder(_memory, 8);
        var context = BringUp(vq, Version1 | EventIdx);
        BarWrite(ConfigMsixVector, 1, 2);
        byte generation = (byte)BarRead(ConfigGeneration, 1);

        WriteStatus(0);
        Assert.Equal(1, _device.Deactivations);
        Assert.Equal(0, Status);
        Assert.Equal(0xFFFFu, BarRead(ConfigMsixVector, 2));
        Assert.NotEqual(generation, (byte)BarRead(ConfigGeneration, 1));
        BarWrite(DriverFeatureSelect, 1);
        Assert.Equal(0u, BarRead(DriverFeature));
        foreach (var q in context.Queues)
        {
            Assert.False(q.Enabled);
            Assert.Equal((ushort)16, q.Size);
            Assert.Equal(0UL, q.DescriptorTable);
            Assert.Equal(0UL, q.UsedRing);
            Assert.False(q.EventIdx);
        }

        // A reset of a device that is not running does not deactivate it again; bringing it up again works.
        WriteStatus(0);
        Assert.Equal(1, _device.Deactivations);
        Assert.Equal(Ack | Driver | FeaturesOk, Negotiate(Version1));
        SetupQueue(0, vq);
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        Assert.Equal(2, _device.Activations.Count);
    }

    [Fact]
    public void A_request_completed_while_the_device_deactivates_lands_in_the_drivers_used_ring()
    {
        // Deactivate returns only when the device's threads stopped touching guest memory, so a worker may still
        // complete its in-flight request during it: the queues must hold the driver's rings until then.
        var vq = new VirtqueueBuilder(_memory, 8);
        var context = BringUp(vq);
        ushort head = vq.AddChain([16], [32]);
        Assert.Equal(PopResult.Chain, context.Queues[0].Pop(out _));
        _device.OnDeactivate = () => context.Queues[0].Complete(head, 32);

        WriteStatus(0);
        Assert.Equal(1, vq.UsedIdx);
        Assert.Equal(((uint)head, 32u), vq.UsedElement(0));
        Span<byte> low = stackalloc byte[16];
        _memory.Read(new GuestAddress(0), low);
        Assert.All(low.ToArray(), b => Assert.Equal(0, b)); // nothing written at guest-physical 0
        Assert.False(context.Queues[0].Enabled);
    }

    [Fact]
    public void A_bad_ring_address_at_DRIVER_OK_sets_DEVICE_NEEDS_RESET()
    {
        EnableMemoryDecode();
        Negotiate(Version1);
        var vq = new VirtqueueBuilder(_memory, 8);
        SetupQueue(0, vq);
        BarWrite(QueueDesc, 0x2000_0000); // past the 16 MiB of RAM
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        Assert.Equal(Ack | Driver | FeaturesOk | DriverOk | VirtioFeatures.StatusNeedsReset, Status);
        Assert.Contains("descriptor table 0x20000000", _function.NeedsResetReason);
        Assert.False(_function.Queues[0].Enabled);

        // Only a reset clears it.
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        Assert.NotEqual(0, Status & VirtioFeatures.StatusNeedsReset);
        WriteStatus(0);
        Assert.Equal(0, Status);
        Assert.Null(_function.NeedsResetReason);
    }

    [Fact]
    public void A_queue_size_that_is_not_a_power_of_two_at_DRIVER_OK_sets_DEVICE_NEEDS_RESET()
    {
        EnableMemoryDecode();
        Negotiate(Version1);
        SetupQueue(1, new VirtqueueBuilder(_memory, 8));
        BarWrite(QueueSize, 12, 2);
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        Assert.NotEqual(0, Status & VirtioFeatures.StatusNeedsReset);
        Assert.Contains("queue size 12", _function.NeedsResetReason);
    }

    // ---- interrupts ----

    [Fact]
    public void Without_MSI_X_a_used_buffer_sets_ISR_bit_0_and_INTx_and_reading_the_ISR_clears_both()
    {
        var vq = new VirtqueueBuilder(_memory, 8);
        var context = BringUp(vq);
        ushort head = vq.AddChain([16], []);
        context.Queues[0].Pop(out _);
        context.Queues[0].Complete(head, 0);
        context.NotifyUsed(0);
        Assert.True(_intx.Level);
        Assert.Equal(1u, BarRead(VirtioPciFunction.IsrOffset, 1));
        Assert.False(_intx.Level);
        Assert.Equal(0u, BarRead(VirtioPciFunction.IsrOffset, 1));

        context.NotifyConfigChange();
        Assert.True(_intx.Level);
        Assert.Equal(2u, BarRead(VirtioPciFunction.IsrOffset, 4));
        Assert.False(_intx.Level);
        Assert.Empty(_msi.Log);
    }

    [Fact]
    public void The_device_can_ask_for_a_reset()
    {
        var context = BringUp(new VirtqueueBuilder(_memory, 8));
        context.NeedsReset("disk went away");
        Assert.NotEqual(0, Status & VirtioFeatures.StatusNeedsReset);
        Assert.Equal("disk went away", _function.NeedsResetReason);
        Assert.Equal(2u, BarRead(VirtioPciFunction.IsrOffset, 1)); // a configuration change interrupt
    }

    [Fact]
    public void INTx_disable_holds_the_line_low_and_clearing_it_reasserts_a_pending_interrupt()
    {
        var context = BringUp(new VirtqueueBuilder(_memory, 8));
        const uint On = PciConfigSpace.CommandMemorySpace | PciConfigSpace.CommandBusMaster;
        CfgWrite(PciConfigSpace.Command, On | PciConfigSpace.CommandInterruptDisable, 2);
        context.NotifyConfigChange();
        Assert.False(_intx.Level);

        CfgWrite(PciConfigSpace.Command, On, 2); // PCI: INTx is asserted again while the function has one pending
        Assert.True(_intx.Level);
        CfgWrite(PciConfigSpace.Command, On | PciConfigSpace.CommandInterruptDisable, 2);
        Assert.False(_intx.Level);
        CfgWrite(PciConfigSpace.Command, On, 2);
        Assert.Equal(2u, BarRead(VirtioPciFunction.IsrOffset, 1));
        Assert.False(_intx.Level);
        CfgWrite(PciConfigSpace.Command, On, 2); // nothing pending: stays low
        Assert.False(_intx.Level);
    }

    private int MsixCap => _function.Config.FindCapability(PciConfigSpace.CapabilityMsix);

    private void ProgramMsixEntry(int vector, uint address, uint data)
    {
        uint entry = VirtioPciFunction.MsixTableOffset + 16u * (uint)vector;
        BarWrite(entry, address);
        BarWrite(entry + 4, 0);
        BarWrite(entry + 8, data);
        BarWrite(entry + 12, 0); // unmask
    }

    [Fact]
    public void With_MSI_X_a_used_buffer_signals_the_queue_vector_and_leaves_ISR_and_INTx_alone()
    {
        EnableMemoryDecode();
        CfgWrite(MsixCap + 2, 0x8000, 2); // MSI-X enable
        ProgramMsixEntry(0, 0xFEE0_0000, 0x30);
        ProgramMsixEntry(1, 0xFEE0_1000, 0x31);
        BarWrite(ConfigMsixVector, 0, 2);
        Assert.Equal(0u, BarRead(ConfigMsixVector, 2));
        var vq = new VirtqueueBuilder(_memory, 8);
        var context = BringUp(vq, queueVector: 1);
        BarWrite(QueueSelect, 0, 2);
        Assert.Equal(1u, BarRead(QueueMsixVector, 2));

        ushort head = vq.AddChain([16], []);
        context.Queues[0].Pop(out _);
        context.Queues[0].Complete(head, 0);
        context.NotifyUsed(0);
        Assert.Equal(["configure 1 0xfee01000 0x31", "trigger 1"], _msi.Log);
        Assert.False(_intx.Level);
        Assert.Equal(0u, BarRead(VirtioPciFunction.IsrOffset, 1));

        context.NotifyConfigChange();
        Assert.Equal(["configure 1 0xfee01000 0x31", "trigger 1", "configure 0 0xfee00000 0x30", "trigger 0"], _msi.Log);

        // The driver asked for no interrupt on the ring: no message.
        vq.AvailFlags = 1;
        head = vq.AddChain([16], []);
        context.Queues[0].Pop(out _);
        context.Queues[0].Complete(head, 0);
        context.NotifyUsed(0);
        Assert.Equal(4, _msi.Log.Count);
    }

    [Fact]
    public void A_vector_the_MSI_X_table_does_not_have_reads_back_as_NO_VECTOR()
    {
        EnableMemoryDecode();
        BarWrite(ConfigMsixVector, 3, 2); // vectors 0-2 exist
        Assert.Equal(0xFFFFu, BarRead(ConfigMsixVector, 2));
        BarWrite(QueueSelect, 1, 2);
        BarWrite(QueueMsixVector, 2, 2);
        Assert.Equal(2u, BarRead(QueueMsixVector, 2));
        BarWrite(QueueMsixVector, 0x7FF, 2);
        Assert.Equal(0xFFFFu, BarRead(QueueMsixVector, 2));
        Assert.Equal(0xFFFF, _function.Queues[1].MsixVector);
    }

    [Fact]
    public void Enabling_MSI_X_drops_an_INTx_level_left_asserted()
    {
        var context = BringUp(new VirtqueueBuilder(_memory, 8));
        context.NotifyConfigChange();
        Assert.True(_intx.Level);
        CfgWrite(MsixCap + 2, 0x8000, 2);
        Assert.False(_intx.Level);
    }

    [Fact]
    public void The_MSI_X_table_and_PBA_are_reachable_through_the_BAR()
    {
        EnableMemoryDecode();
        Assert.Equal(1u, BarRead(VirtioPciFunction.MsixTableOffset + 12)); // masked at reset
        BarWrite(VirtioPciFunction.MsixTableOffset + 16 + 8, 0x55);
        Assert.Equal(0x55u, BarRead(VirtioPciFunction.MsixTableOffset + 16 + 8));
        Assert.Equal(0u, BarRead(VirtioPciFunction.MsixPbaOffset));
        _function.Msix.Signal(2); // MSI-X off: pending
        Assert.Equal(4u, BarRead(VirtioPciFunction.MsixPbaOffset));
    }

    // ---- notifications ----

    [Fact]
    public void A_notify_write_through_the_BAR_signals_the_queues_kick()
    {
        var context = BringUp(new VirtqueueBuilder(_memory, 8));
        Assert.False(context.Kicks[1].TryRead(out _));
        BarWrite(VirtioPciFunction.NotifyOffset + 4, 1, 2); // queue 1's notify_off is 1, multiplier 4
        Assert.True(context.Kicks[1].TryRead(out ulong count));
        Assert.Equal(1UL, count);
        Assert.False(context.Kicks[0].TryRead(out _));
        BarWrite(VirtioPciFunction.NotifyOffset, 0, 4);
        Assert.True(context.Kicks[0].TryRead(out _));
        BarWrite(VirtioPciFunction.NotifyOffset + 8, 2, 2); // past the last queue: nothing
        Assert.False(context.Kicks[0].TryRead(out _));
        Assert.False(context.Kicks[1].TryRead(out _));
    }

    [Fact]
    public void A_reset_drains_stale_kicks()
    {
        var context = BringUp(new VirtqueueBuilder(_memory, 8));
        BarWrite(VirtioPciFunction.NotifyOffset, 0, 2);
        WriteStatus(0);
        Assert.False(context.Kicks[0].TryRead(out _));
    }

    [Fact]
    public void Ioeventfds_follow_the_notify_area_wherever_the_BAR_decodes()
    {
        Assert.Empty(_ioEvents.Log); // no decode yet
        EnableMemoryDecode();
        ulong n = Bar + VirtioPciFunction.NotifyOffset;
        Assert.Equal([$"+0x{n:x}/2", $"+0x{n:x}/4", $"+0x{n + 4:x}/2", $"+0x{n + 4:x}/4"], _ioEvents.Log);

        _ioEvents.Log.Clear();
        const ulong moved = 0xD000_0000;
        CfgWrite(PciConfigSpace.Bar0, (uint)moved);
        ulong m = moved + VirtioPciFunction.NotifyOffset;
        Assert.Equal([$"-0x{n:x}/2", $"-0x{n:x}/4", $"-0x{n + 4:x}/2", $"-0x{n + 4:x}/4",
            $"+0x{m:x}/2", $"+0x{m:x}/4", $"+0x{m + 4:x}/2", $"+0x{m + 4:x}/4"], _ioEvents.Log);

        // The registered eventfds are the queues' kicks.
        Negotiate(Version1);
        WriteStatus(Ack | Driver | FeaturesOk | DriverOk);
        var context = Assert.Single(_device.Activations);
        Assert.Same(context.Kicks[1], _ioEvents.Registered[(m + 4, 2)]);
        Assert.Same(context.Kicks[0], _ioEvents.Registered[(m, 4)]);

        _ioEvents.Log.Clear();
        EnableMemoryDecode(false);
        Assert.Equal([$"-0x{m:x}/2", $"-0x{m:x}/4", $"-0x{m + 4:x}/2", $"-0x{m + 4:x}/4"], _ioEvents.Log);
        Assert.Empty(_ioEvents.Registered);
    }

    // ---- device configuration and the PCI configuration access capability ----

    [Fact]
    public void Device_configuration_is_read_and_written_through_the_BAR()
    {
        EnableMemoryDecode();
        Assert.Equal(0x0403_0201u, BarRead(VirtioPciFunction.DeviceOffset));
        Assert.Equal(0x08u, BarRead(VirtioPciFunction.DeviceOffset + 7, 1));
        Assert.Equal(0u, BarRead(VirtioPciFunction.DeviceOffset + 6, 4)); // runs past the 8 bytes
        BarWrite(VirtioPciFunction.DeviceOffset + 4, 0xAABB, 2);
        Assert.Equal([1, 2, 3, 4, 0xBB, 0xAA, 7, 8], _device.ConfigBytes);
    }

    [Fact]
    public void The_PCI_configuration_access_capability_reads_and_writes_the_BAR()
    {
        int cap = VirtioCaps()[5];
        // Memory decode stays off: this window is how a driver reaches the BAR without mapping it.
        CfgWrite(cap + 4, 0, 1);                 // bar
        CfgWrite(cap + 8, DeviceFeature);        // offset
        CfgWrite(cap + 12, 4);                   // length
        Assert.Equal((uint)(DeviceFeatureBit3 | EventIdx | IndirectDesc), CfgRead(cap + 16));

        CfgWrite(cap + 8, DeviceStatus);
        CfgWrite(cap + 12, 1);
        CfgWrite(cap + 16, Ack, 1);
        Assert.Equal(Ack, _function.Status);
        Assert.Equal((uint)Ack, CfgRead(cap + 16, 1));

        // A word-wide window on the device configuration.
        CfgWrite(cap + 8, VirtioPciFunction.DeviceOffset + 2);
        CfgWrite(cap + 12, 2);
        Assert.Equal(0x0403u, CfgRead(cap + 16, 2));

        // Another BAR, or a length other than 1, 2 or 4: all-ones, and writes go nowhere.
        CfgWrite(cap + 4, 1, 1);
        Assert.Equal(0xFFFF_FFFFu, CfgRead(cap + 16));
        CfgWrite(cap + 4, 0, 1);
        CfgWrite(cap + 8, DeviceStatus);
        CfgWrite(cap + 12, 3);
        Assert.Equal(0xFFFF_FFFFu, CfgRead(cap + 16));
        CfgWrite(cap + 16, 0, 1);
        Assert.Equal(Ack, _function.Status);
    }

    // ---- lifetime ----

    [Fact]
    public void Dispose_deactivates_a_running_device_and_disposes_it()
    {
        BringUp(new VirtqueueBuilder(_memory, 8));
        _function.Dispose();
        Assert.Equal(1, _device.Deactivations);
        Assert.True(_device.Disposed);
    }

    [Fact]
    public void Devices_that_do_not_fit_the_transport_are_refused()
    {
        Assert.Contains("queues", Assert.Throws<PciConfigException>(() =>
            new VirtioPciFunction(new ManyQueues(), _memory, _msi, null)).Message);
    }

    private sealed class ManyQueues : VirtioDevice
    {
        public override VirtioDeviceType Type => VirtioDeviceType.Net;
        public override string Name => "many";
        public override (byte Class, byte SubClass) PciClass => (2, 0);
        public override ulong DeviceFeatures => 0;
        public override int QueueCount => 65;
        public override int ConfigSize => 0;
        public override void ReadConfig(int offset, Span<byte> data) { }
        public override void Activate(VirtioContext context) { }
        public override void Deactivate() { }
    }
}
