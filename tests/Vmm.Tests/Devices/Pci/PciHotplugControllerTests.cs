using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Pci;

public class PciHotplugControllerTests
{
    private readonly RecordingInterruptLine _ged = new();
    private readonly List<int> _ejected = [];
    private readonly PciHotplugController _c;

    public PciHotplugControllerTests() => _c = new PciHotplugController(_ged, _ejected.Add);

    private uint Read(ulong offset)
    {
        Span<byte> b = stackalloc byte[4];
        _c.Read(offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private void Write(ulong offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        _c.Write(offset, b);
    }

    [Fact]
    public void An_added_slot_pulses_the_GED_and_shows_in_PCIU_until_read()
    {
        _c.SignalUp(5);
        _c.SignalUp(7);
        Assert.Equal(2, _ged.RisingEdges);
        Assert.False(_ged.Level); // a pulse: the DSDT declares the GED interrupt edge-triggered
        Assert.Equal(0u, Read(PciHotplugController.PciDown));
        Assert.Equal((1u << 5) | (1u << 7), Read(PciHotplugController.PciUp));
        Assert.Equal(0u, Read(PciHotplugController.PciUp)); // read clears, as CH's PCIU
    }

    [Fact]
    public void A_removal_shows_in_PCID_until_read_and_cancels_a_pending_up_of_the_same_slot()
    {
        _c.SignalUp(3);
        _c.SignalDown(3);
        Assert.Equal(0u, Read(PciHotplugController.PciUp));
        Assert.Equal(1u << 3, Read(PciHotplugController.PciDown));
        Assert.Equal(0u, Read(PciHotplugController.PciDown));
    }

    [Fact]
    public void A_narrow_read_peeks_without_clearing()
    {
        _c.SignalUp(9); // bit 9: byte 1
        Span<byte> one = stackalloc byte[1];
        _c.Read(PciHotplugController.PciUp + 1, one);
        Assert.Equal(2, one[0]);
        Assert.Equal(1u << 9, Read(PciHotplugController.PciUp));
    }

    [Fact]
    public void Writing_B0EJ_ejects_each_slot_whose_bit_is_set_but_never_the_host_bridge()
    {
        Write(PciHotplugController.Eject, (1u << 4) | (1u << 31) | 1u);
        Assert.Equal([4, 31], _ejected);
        Assert.Equal(0u, Read(PciHotplugController.Eject));
        Write(PciHotplugController.Segment, 1); // one segment: ignored
        Write(PciHotplugController.PciUp, 0xFFFF_FFFF); // read-only
        Assert.Equal(0u, Read(PciHotplugController.Segment));
        Assert.Equal(0u, Read(PciHotplugController.PciUp));
        Assert.Equal(0, _ged.RisingEdges);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(32)]
    public void Slots_outside_1_to_31_cannot_be_signalled(int slot) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => _c.SignalUp(slot));
}
