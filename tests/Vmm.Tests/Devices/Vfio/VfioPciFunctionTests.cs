using System.Buffers.Binary;
using Vmm.Devices.Pci;
using Vmm.Devices.Vfio;
using Vmm.Memory;
using Vmm.Tests.TestKit;
using static Vmm.Tests.Devices.Vfio.GpuFixtures;

namespace Vmm.Tests.Devices.Vfio;

public sealed class VfioPciFunctionTests : IDisposable
{
    private readonly RecordingMsiController _msi = new();
    private readonly RecordingGuestMemoryMapper _mapper = new();
    private readonly RecordingIntxLine _intx = new();
    private readonly List<string> _log = [];
    private readonly List<VfioPciFunction> _functions = [];

    private VfioPciFunction Create(FakeVfioDevice device, bool intx = true)
    {
        var f = new VfioPciFunction(device, _msi, _mapper, intx ? _intx : null, _log.Add);
        _functions.Add(f);
        return f;
    }

    public void Dispose()
    {
        foreach (var f in _functions)
            f.Dispose();
    }

    private static uint Read(PciFunction f, int offset, int width = 4)
    {
        Span<byte> b = stackalloc byte[4];
        f.ConfigRead(offset, b[..width]);
        return BinaryPrimitives.ReadUInt32LittleEndian(b) & (width == 4 ? 0xFFFF_FFFF : (1u << (8 * width)) - 1);
    }

    private static void Write(PciFunction f, int offset, uint value, int width = 4)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        f.ConfigWrite(offset, b[..width]);
    }

    private static uint BarRead(PciFunction f, int bar, ulong offset)
    {
        Span<byte> b = stackalloc byte[4];
        f.BarRead(bar, offset, b);
        return BinaryPrimitives.ReadUInt32LittleEndian(b);
    }

    private static void BarWrite(PciFunction f, int bar, ulong offset, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        f.BarWrite(bar, offset, b);
    }

    /// <summary>The capability chains as a guest walks them through config reads: legacy (offset, id), then extended.</summary>
    private static (List<(int, int)> Legacy, List<(int, int)> Extended) GuestChains(PciFunction f)
    {
        var legacy = new List<(int, int)>();
        for (int at = (int)Read(f, 0x34, 1), hops = 0; at != 0 && hops < 64; hops++)
        {
            legacy.Add((at, (int)Read(f, at, 1)));
            at = (int)Read(f, at + 1, 1);
        }
        var extended = new List<(int, int)>();
        for (int at = 0x100, hops = 0; at != 0 && hops < 64; hops++)
        {
            uint header = Read(f, at);
            if (header == 0)
                break;
            extended.Add((at, (int)(header & 0xFFFF)));
            at = (int)(header >> 20);
        }
        return (legacy, extended);
    }

    // ---- header and BARs ----

    [Fact]
    public void Identity_registers_pass_through_and_the_header_is_a_single_function_endpoint()
    {
        var device = A100();
        device.ConfigBytes[0x0E] = 0x80; // the device says multi-function; vmm shows function 0 alone
        var f = Create(device);
        Assert.Equal(0x20B2_10DEu, Read(f, 0x00));
        Assert.Equal(0x0302_00A1u, Read(f, 0x08));
        Assert.Equal(0x1463_10DEu, Read(f, 0x2C));
        Assert.Equal(0u, Read(f, 0x0E, 1));
        Assert.Equal((uint)A100Pm, Read(f, 0x34, 1));
        Assert.Equal(1u, Read(f, 0x3D, 1)); // INTA#
        Assert.Equal("0000:41:00.0", f.Name);
    }

    [Fact]
    public void Resets_the_device_on_construction_only_when_it_can()
    {
        var resettable = A100();
        Create(resettable);
        Assert.Equal(1, resettable.Resets);
        Assert.Equal("reset", resettable.Log[0]);
        var plain = IntxOnly(canReset: false);
        Create(plain);
        Assert.Equal(0, plain.Resets);
    }

    [Fact]
    public void BARs_have_the_region_sizes_and_the_devices_type_bits()
    {
        var f = Create(A100());
        Assert.Equal(
            [(0, 16 * MiB, PciBarKind.Memory32, false), (1, 128 * GiB, PciBarKind.Memory64, true),
             (3, 32 * MiB, PciBarKind.Memory64, true), (6, 256 * KiB, PciBarKind.Memory32, false)],
            f.Config.Bars.Select(b => (b.Index, b.Size, b.Kind, b.Prefetchable)));
        // Sizing probes, as a BIOS or Linux does them.
        for (int reg = 0x10; reg <= 0x24; reg += 4)
            Write(f, reg, 0xFFFF_FFFF);
        Assert.Equal(0xFF00_0000u, Read(f, 0x10));                  // 16 MiB, 32-bit
        Assert.Equal(0x0000_000Cu, Read(f, 0x14));                  // 128 GiB: no low address bits, 64-bit prefetchable
        Assert.Equal(0xFFFF_FFE0u, Read(f, 0x18));                  // ~(128 GiB - 1) >> 32
        Assert.Equal(0xFE00_000Cu, Read(f, 0x1C));                  // 32 MiB, 64-bit prefetchable
        Assert.Equal(0xFFFF_FFFFu, Read(f, 0x20));
        Assert.Equal(0u, Read(f, 0x24));                            // the I/O BAR is left out
        Assert.Contains(_log, l => l.Contains("BAR5: I/O space (0x80 bytes) is not supported"));
    }

    [Fact]
    public void ROM_BAR_is_sized_enabled_and_read_from_region_6()
    {
        var f = Create(A100());
        Write(f, 0x30, 0xFFFF_F800);
        Assert.Equal(0xFFFC_0000u, Read(f, 0x30)); // 0x3E000 bytes round up to a 256 KiB BAR
        Write(f, 0x30, 0xC100_0001);
        Assert.Equal(0xC100_0001u, Read(f, 0x30));
        Assert.True(f.Config.RomEnabled);
        Assert.Equal(0xC100_0000ul, f.Config.BarAddress(PciConfigSpace.RomBarIndex));
        Assert.Equal(0x0000_AA55u, BarRead(f, 6, 0) & 0xFFFF);
        Assert.Equal(0x5A00_0000u, BarRead(f, 6, A100RomSize - 4));
        Assert.Equal(0xFFFF_FFFFu, BarRead(f, 6, A100RomSize));     // the rounded-up rest decodes nothing
        BarWrite(f, 6, 0, 0);                                        // ignored: a ROM
        Assert.Equal(0x0000_AA55u, BarRead(f, 6, 0) & 0xFFFF);
    }

    // ---- command register and config writes ----

    [Fact]
    public void Command_bits_are_virtual_and_forwarded_keeping_the_devices_other_bits()
    {
        var device = A100();
        var f = Create(device);
        Assert.Equal(0x0100, device.DeviceCommand);               // construction: memory and bus master off
        Write(f, 0x04, 0x0407, 2);                                  // I/O (not supported) + memory + bus master + INTx disable
        Assert.Equal(0x0406u, Read(f, 0x04, 2));
        Assert.Equal(0x0506, device.DeviceCommand);               // the device sees bus master (DMA) and keeps SERR#
        Write(f, 0x04, 0x0002, 2);
        Assert.Equal(0x0102, device.DeviceCommand);
        Assert.True(f.Config.MemoryDecodeEnabled);
        Assert.False(f.Config.BusMasterEnabled);
    }

    [Fact]
    public void Writes_reach_the_device_only_for_safe_registers()
    {
        var device = A100();
        var f = Create(device);
        device.Log.Clear();
        Write(f, A100Vendor + 4, 0xDEAD_BEEF);                     // vendor capability body: read-only
        Write(f, 0x08, 0xFFFF_FFFF);                                // revision/class
        Write(f, 0x420 + 0x08, 0xFFFF_FFFF);                        // AER uncorrectable mask: not forwarded
        Assert.Empty(device.Log);
        Assert.Equal(0x0302_00A1u, Read(f, 0x08));

        Write(f, A100Pm + 4, 0x0003, 2);                            // PMCSR: D3hot
        Assert.Equal(0x000Bu, BinaryPrimitives.ReadUInt16LittleEndian(device.ConfigBytes.AsSpan(A100Pm + 4)));
        Write(f, A100Pcie + 8, 0xA930, 2);                          // device control with Initiate FLR
        Assert.Equal(0x2930, BinaryPrimitives.ReadUInt16LittleEndian(device.ConfigBytes.AsSpan(A100Pcie + 8)));
        Write(f, 0x420 + 4, 0x0000_1000);                           // AER status, write-1-to-clear: forwarded
        Assert.Contains("cfg w 0x424 00100000", device.Log);
    }

    // ---- capabilities ----

    [Fact]
    public void The_capability_chain_shows_emulated_and_passed_through_capabilities_and_hides_SR_IOV_and_resizable_BAR()
    {
        var f = Create(A100());
        var (legacy, extended) = GuestChains(f);
        Assert.Equal([(A100Pm, 0x01), (A100Msi, 0x05), (A100Pcie, 0x10), (A100Msix, 0x11), (A100Vendor, 0x09)], legacy);
        Assert.Equal([(0x100, 0x02), (0x128, 0x04), (0x420, 0x01), (0x600, 0x0B), (0x900, 0x19), (0xC14, 0x0F)], extended);
        Assert.DoesNotContain(extended, c => c.Item2 is 0x10 or 0x15);
        Assert.Contains(_log, l => l.Contains("0x0010 at 0xbcc hidden"));
        // Passed through: the PCIe capability register and the PM capabilities.
        Assert.Equal(0x0002u, Read(f, A100Pcie + 2, 2));
        Assert.Equal(0x0003u, Read(f, A100Pm + 2, 2));
        // Emulated: MSI-X says BAR0, the device's offsets, 6 vectors.
        Assert.Equal(0x0005u, Read(f, A100Msix + 2, 2));
        Assert.Equal(A100MsixTable, Read(f, A100Msix + 4));
        Assert.Equal(A100MsixPba, Read(f, A100Msix + 8));
        Assert.Equal(new PciCapabilityEntry(true, 0xC14, 0x0F, 1), f.PresentedCapabilities[^1]);
    }

    [Fact]
    public void Hidden_first_extended_capability_leaves_a_null_header_linking_on()
    {
        var f = Create(MsiOnly());
        Assert.Equal(0x140u << 20, Read(f, 0x100));
        var (legacy, extended) = GuestChains(f);
        Assert.Equal([(0x40, 0x01), (MsiOnlyMsi, 0x05), (0x70, 0x10)], legacy);
        Assert.Equal([(0x100, 0x00), (0x140, 0x01)], extended);
        Assert.Null(f.Msix);
    }

    [Fact]
    public void Looping_capability_lists_end_where_they_loop()
    {
        var f = Create(LoopingChain());
        var (legacy, extended) = GuestChains(f);
        Assert.Equal([(0x40, 0x01), (0x50, 0x05)], legacy);
        Assert.Equal([(0x100, 0x01)], extended);
        Assert.Contains(_log, l => l.Contains("capability list loops back to 0x40"));
        Assert.Contains(_log, l => l.Contains("extended capability list loops back to 0x100"));
    }

    [Fact]
    public void Conventional_device_has_no_capabilities_and_reads_zero_beyond_256_bytes()
    {
        var f = Create(IntxOnly());
        Assert.Equal(0u, Read(f, 0x34, 1));
        Assert.Equal(0u, Read(f, 0x100));
        Assert.Empty(f.PresentedCapabilities);
    }

    // ---- MSI-X ----

    private static void ProgramMsix(PciFunction f, int vector, ulong address, uint data, bool masked)
    {
        ulong entry = A100MsixTable + (ulong)vector * 16;
        BarWrite(f, 0, entry, (uint)address);
        BarWrite(f, 0, entry + 4, (uint)(address >> 32));
        BarWrite(f, 0, entry + 8, data);
        BarWrite(f, 0, entry + 12, masked ? 1u : 0);
    }

    [Fact]
    public void Enabling_MSI_X_hands_the_vector_eventfds_to_the_device_after_disabling_INTx()
    {
        var device = A100();
        var f = Create(device);
        Assert.Equal(VfioPciFunction.InterruptMode.Intx, f.Mode);
        Assert.Equal(6, f.Msix!.Count);
        var msixVectors = _msi.Vectors.Skip(_msi.Vectors.Count - 6).ToList();
        Assert.All(msixVectors, v => Assert.True(v.Masked)); // all start masked: nothing enabled
        device.Log.Clear();

        Write(f, A100Msix + 2, 0xC000, 2); // enable + function mask, as Linux starts
        Assert.Equal(["disable Intx", $"irq Msix 0 fds={string.Join(",", msixVectors.Select(v => v.EventFd.Fd))}"], device.Log);
        Assert.Equal(VfioPciFunction.InterruptMode.Msix, f.Mode);
        Assert.Null(_intx.Attached);
        Assert.All(msixVectors, v => Assert.True(v.Masked));

        ProgramMsix(f, 2, 0xFEE0_1000, 0x4041, masked: false);
        Assert.True(msixVectors[2].Masked);                        // the function mask still holds it
        Write(f, A100Msix + 2, 0x8000, 2);                          // drop the function mask
        Assert.False(msixVectors[2].Masked);
        Assert.Equal((0xFEE0_1000ul, 0x4041u), msixVectors[2].Message);
        Assert.All(msixVectors.Where(v => v.Index != 2), v => Assert.True(v.Masked));
        Assert.Equal(0x4041u, BarRead(f, 0, A100MsixTable + 2 * 16 + 8));

        BarWrite(f, 0, A100MsixTable + 2 * 16 + 12, 1);           // per-vector mask
        Assert.True(msixVectors[2].Masked);
        BarWrite(f, 0, A100MsixTable + 2 * 16 + 12, 0);
        Assert.False(msixVectors[2].Masked);

        device.Log.Clear();
        Write(f, A100Msix + 2, 0x0000, 2);                          // disable: back to INTx
        Assert.Equal("disable Msix", device.Log[0]);
        Assert.Equal(VfioPciFunction.InterruptMode.Intx, f.Mode);
        Assert.True(msixVectors[2].Masked);
        Assert.NotNull(_intx.Attached);
    }

    [Fact]
    public void MSI_X_reroute_of_an_unmasked_vector_reconfigures_it()
    {
        var f = Create(A100());
        var v0 = _msi.Vectors[^6];
        Write(f, A100Msix + 2, 0x8000, 2);
        ProgramMsix(f, 0, 0xFEE0_0000, 0x30, masked: false);
        Assert.Equal((0xFEE0_0000ul, 0x30u), v0.Message);
        BarWrite(f, 0, A100MsixTable + 8, 0x31);
        Assert.Equal((0xFEE0_0000ul, 0x31u), v0.Message);
    }

    [Fact]
    public void PBA_reports_signals_that_wait_in_masked_vectors()
    {
        var f = Create(A100());
        var vectors = _msi.Vectors.Skip(_msi.Vectors.Count - 6).ToList();
        Write(f, A100Msix + 2, 0x8000, 2);
        ProgramMsix(f, 1, 0xFEE0_0000, 0x41, masked: true);
        ProgramMsix(f, 3, 0xFEE0_0000, 0x43, masked: false);
        Assert.Equal(0u, BarRead(f, 0, A100MsixPba));
        vectors[1].EventFd.Signal();                                // the device raises masked vector 1
        vectors[3].EventFd.Signal();                                // and unmasked vector 3: KVM's, not pending
        Assert.Equal(0b10u, BarRead(f, 0, A100MsixPba));
        BarWrite(f, 0, A100MsixPba, 0);                             // the PBA is read-only
        Assert.Equal(0b10u, BarRead(f, 0, A100MsixPba));
        Assert.True(vectors[1].IsPending);
        BarWrite(f, 0, A100MsixTable + 16 + 12, 0);                // unmask: KVM delivers what waited
        Assert.False(vectors[1].Masked);
        Assert.Equal(0u, BarRead(f, 0, A100MsixPba));
    }

    [Fact]
    public void MSI_X_pointing_outside_the_BARs_is_hidden()
    {
        var device = A100();
        BinaryPrimitives.WriteUInt32LittleEndian(device.ConfigBytes.AsSpan(A100Msix + 4), 0x0100_0000 | 5); // BAR5: I/O, left out
        var f = Create(device);
        Assert.Null(f.Msix);
        Assert.DoesNotContain(GuestChains(f).Legacy, c => c.Item2 == 0x11);
        Assert.Contains(_log, l => l.Contains("MSI-X capability at 0xb4 hidden"));
    }

    // ---- MSI ----

    [Fact]
    public void Enabling_MSI_with_four_vectors_routes_each_and_hands_the_device_four_eventfds()
    {
        var device = MsiOnly();
        var f = Create(device);
        var msi = f.Msi!;
        Assert.Equal(4, msi.VectorCount);
        Assert.Equal(0x0184u, Read(f, MsiOnlyMsi + 2, 2));          // MMC 4, 64-bit, per-vector masking; disabled
        device.Log.Clear();
        Write(f, MsiOnlyMsi + 4, 0xFEE0_2000);
        Write(f, MsiOnlyMsi + 8, 0);
        Write(f, MsiOnlyMsi + 0xC, 0x4023, 2);                      // data; the low two bits become the vector number
        Write(f, MsiOnlyMsi + 2, 0x0021, 2);                        // MME = 2 (4 vectors), enable
        var vectors = Enumerable.Range(0, 4).Select(i => (RecordingMsiController.RecordingMsiVector)msi.Vector(i)).ToList();
        Assert.Equal([0x4020u, 0x4021u, 0x4022u, 0x4023u], vectors.Select(v => v.Message!.Value.Data));
        Assert.All(vectors, v => Assert.Equal(0xFEE0_2000ul, v.Message!.Value.Address));
        Assert.All(vectors, v => Assert.False(v.Masked));
        Assert.Equal(["disable Intx", $"irq Msi 0 fds={string.Join(",", vectors.Select(v => v.EventFd.Fd))}"], device.Log);
        Assert.Equal(VfioPciFunction.InterruptMode.Msi, f.Mode);

        Write(f, MsiOnlyMsi + 0x10, 0b0100);                        // mask vector 2
        Assert.True(vectors[2].Masked);
        vectors[2].EventFd.Signal();
        Assert.Equal(0b0100u, Read(f, MsiOnlyMsi + 0x14));          // pending while masked
        Write(f, MsiOnlyMsi + 0x10, 0);
        Assert.False(vectors[2].Masked);
        Assert.Equal(0u, Read(f, MsiOnlyMsi + 0x14));

        device.Log.Clear();
        Write(f, MsiOnlyMsi + 2, 0x0000, 2);
        Assert.Equal("disable Msi", device.Log[0]);
        Assert.All(vectors, v => Assert.True(v.Masked));
        Assert.Equal(VfioPciFunction.InterruptMode.Intx, f.Mode);
    }

    [Fact]
    public void MSI_enabling_fewer_vectors_than_capable_leaves_the_rest_masked()
    {
        var device = MsiOnly();
        var f = Create(device);
        Write(f, MsiOnlyMsi + 4, 0xFEE0_0000);
        Write(f, MsiOnlyMsi + 0xC, 0x0051, 2);
        Write(f, MsiOnlyMsi + 2, 0x0001, 2);                        // MME = 0: one vector
        var v0 = (RecordingMsiController.RecordingMsiVector)f.Msi!.Vector(0);
        Assert.Equal((0xFEE0_0000ul, 0x51u), v0.Message);
        Assert.False(v0.Masked);
        Assert.All(Enumerable.Range(1, 3), i => Assert.True(((RecordingMsiController.RecordingMsiVector)f.Msi.Vector(i)).Masked));
        Assert.Single(device.IrqSets[^1].Fds);
    }

    // ---- INTx ----

    [Fact]
    public void INTx_is_attached_while_no_MSI_and_INTx_disable_is_clear()
    {
        var device = IntxOnly();
        var f = Create(device);
        Assert.Equal(2u, Read(f, 0x3D, 1));                         // INTB# from the device
        Assert.NotNull(_intx.Attached);
        var (trigger, resample) = _intx.Attached!.Value;
        Assert.Equal(["attach " + trigger.Fd + " " + resample.Fd], _intx.Log);
        Assert.Equal((VfioIrqIndex.Intx, 0), (device.IrqSets[0].Index, device.IrqSets[0].Start));
        Assert.Equal([trigger.Fd], device.IrqSets[0].Fds);
        Assert.Equal(resample.Fd, device.IntxUnmaskFd);
        Assert.True(device.Log.IndexOf($"irq Intx 0 fds={trigger.Fd}") < device.Log.IndexOf($"unmask-fd {resample.Fd}"));

        device.Log.Clear();
        Write(f, 0x04, 0x0400, 2);                                  // INTx disable
        Assert.Equal(["cfg w 0x04 0004", "disable Intx"], device.Log); // the device gets the bit too
        Assert.Null(_intx.Attached);
        Assert.Equal(VfioPciFunction.InterruptMode.None, f.Mode);
        Write(f, 0x04, 0x0000, 2);
        Assert.NotNull(_intx.Attached);
        Assert.Equal(["attach", "detach", "attach"], _intx.Log.Select(l => l.Split(' ')[0]));
    }

    [Fact]
    public void Without_an_INTx_line_the_pin_reads_zero_and_nothing_is_attached()
    {
        var device = IntxOnly();
        var f = Create(device, intx: false);
        Assert.Equal(0u, Read(f, 0x3D, 1));
        Assert.Empty(device.IrqSets);
        Assert.Equal(VfioPciFunction.InterruptMode.None, f.Mode);
    }

    // ---- BAR mapping ----

    private static ulong Page => (ulong)Environment.SystemPageSize;

    [Fact]
    public void Mapped_BARs_go_into_the_guest_without_the_MSI_X_pages_and_follow_moves_and_decode()
    {
        var device = A100();
        var f = Create(device);
        var root = new PciRootBus(MemoryLayout.Pci64Window(2 * GiB, 512 * GiB).Start, 512 * GiB);
        int slot = root.Add(f);
        ulong bar0 = f.Config.BarAddress(0), bar1 = f.Config.BarAddress(1), bar3 = f.Config.BarAddress(3);
        Assert.Empty(_mapper.Live);                                 // memory decode is off

        EcamWrite(root, slot, 0x04, 0x0006);
        Assert.Equal(
            [(bar0, A100MsixTable), (bar0 + A100MsixTable + Page, A100MsixPba - A100MsixTable - Page),
             (bar0 + A100MsixPba + Page, 16 * MiB - A100MsixPba - Page), (bar3, 32 * MiB), (bar1, 128 * GiB)], // BAR3 fits below BAR1
            _mapper.Live.Select(s => (s.Guest, s.Size)).OrderBy(s => s.Guest));
        Assert.Equal(3, device.LiveMappings);                       // one host mapping per mmap area
        // The slot past the MSI-X table is the device's memory at that offset.
        var afterTable = _mapper.Live.Single(s => s.Guest == bar0 + A100MsixTable + Page);
        unsafe { *(uint*)afterTable.Host = 0x1234_5678; }
        Assert.Equal(0x1234_5678u, BinaryPrimitives.ReadUInt32LittleEndian(device.BarMemory(0, A100MsixTable + Page, 4)));

        // The guest moves BAR3: its slot is replaced, the others stay; the host mapping is reused.
        _mapper.Log.Clear();
        ulong newBar3 = bar3 + 64 * MiB;
        EcamWrite(root, slot, 0x1C, (uint)newBar3 | 0xC);
        EcamWrite(root, slot, 0x20, (uint)(newBar3 >> 32));
        Assert.Equal([$"-0x{bar3:x}/0x{32 * MiB:x}", $"+0x{newBar3:x}/0x{32 * MiB:x}"], _mapper.Log);
        Assert.Equal(3, device.Log.Count(l => l.StartsWith("map ", StringComparison.Ordinal)));

        EcamWrite(root, slot, 0x04, 0x0000);                        // decode off: every slot goes
        Assert.Empty(_mapper.Live);
        f.Dispose();
        Assert.Equal(0, device.LiveMappings);
        Assert.True(device.Disposed);
    }

    private static void EcamWrite(PciRootBus root, int slot, int register, uint value)
    {
        Span<byte> b = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(b, value);
        root.Ecam.Write(((ulong)slot << 15) | (uint)register, b);
    }

    [Fact]
    public void A100_fits_the_root_bus_with_128_GiB_BAR1_naturally_aligned()
    {
        var f = Create(A100());
        var (start, size) = MemoryLayout.Pci64Window(8 * GiB, 512 * GiB);
        var root = new PciRootBus(start, size);
        root.Add(f);
        ulong bar1 = f.Config.BarAddress(1);
        Assert.Equal(0ul, bar1 % (128 * GiB));
        Assert.InRange(bar1, start, start + size - 128 * GiB);
        Assert.Equal(0ul, f.Config.BarAddress(3) % (32 * MiB));
        Assert.InRange(f.Config.BarAddress(3), start, start + size);
        Assert.InRange(f.Config.BarAddress(0), MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size - 16 * MiB);
        Assert.InRange(f.Config.BarAddress(PciConfigSpace.RomBarIndex), MemoryLayout.PciMmio32Start, MemoryLayout.PciMmio32Start + MemoryLayout.PciMmio32Size);
        Assert.Equal(0u, f.Config.Get32(0x30) & 1);                 // placed, not enabled
    }

    [Fact]
    public void A100_does_not_fit_the_default_64_GiB_window()
    {
        var f = Create(A100());
        var (start, size) = MemoryLayout.Pci64Window(8 * GiB);
        var e = Assert.Throws<PciConfigException>(() => new PciRootBus(start, size).Add(f));
        Assert.Contains("BAR1 64-bit prefetchable memory, 0x2000000000 bytes does not fit in the 64-bit PCI window", e.Message);
    }

    [Fact]
    public void Trapped_BAR_accesses_go_to_the_region()
    {
        var device = A100();
        var f = Create(device);
        BinaryPrimitives.WriteUInt32LittleEndian(device.BarMemory(0, 0x88000, 4), 0xCAFE_F00D);
        Assert.Equal(0xCAFE_F00Du, BarRead(f, 0, 0x88000));
        BarWrite(f, 0, 0x88004, 0x600D_D00D);
        Assert.Contains("bar w 0 0x88004 0DD00D60", device.Log);
        // The rest of the MSI-X table's page is the device's own registers.
        BinaryPrimitives.WriteUInt32LittleEndian(device.BarMemory(0, A100MsixTable + 0x800, 4), 0x0BAD_CAFE);
        Assert.Equal(0x0BAD_CAFEu, BarRead(f, 0, A100MsixTable + 0x800));
    }

    [Fact]
    public void Failing_device_reads_give_all_ones_and_are_logged()
    {
        var device = A100();
        var f = Create(device);
        device.FailingRegions.Add(0);
        device.FailingRegions.Add(VfioRegionIndex.Config);
        Assert.Equal(0xFFFF_FFFFu, BarRead(f, 0, 0x100));
        Assert.Equal(0xFFFF_FFFFu, Read(f, 0x00));                  // IDs come from the device
        Assert.Equal(0x0000u, Read(f, 0x04, 2));                    // the command register is vmm's
        BarWrite(f, 0, 0x100, 1);                                   // a failing write is logged, not thrown
        Assert.Equal(3, f.ErrorCount);
        Assert.Contains(_log, l => l.Contains("BAR0 read at 0x100 failed") && l.Contains("ENODEV"));
        Assert.Contains(_log, l => l.Contains("config read at 0x000 failed"));
        for (int i = 0; i < 40; i++)
            BarRead(f, 0, 0x100);
        Assert.Equal(16, _log.Count(l => l.Contains("failed")));    // the log does not flood
    }

    [Fact]
    public void Dispose_tears_down_interrupts_and_mappings()
    {
        var device = A100();
        var f = Create(device);
        var root = new PciRootBus(MemoryLayout.Pci64Window(2 * GiB, 512 * GiB).Start, 512 * GiB);
        int slot = root.Add(f);
        EcamWrite(root, slot, 0x04, 0x0006);
        Write(f, A100Msix + 2, 0x8000, 2);
        device.Log.Clear();
        f.Dispose();
        Assert.Equal("disable Msix", device.Log[0]);
        Assert.Empty(_mapper.Live);
        Assert.Equal(0, device.LiveMappings);
        Assert.True(device.Disposed);
    }

    // Found by the pci-vfio fuzz target (tools/fuzz/regressions/pci-vfio): a config region may be shorter than 256
    // bytes — a vfio-user server declares its size, and vmm takes 64 and up — and a capability pointer or an MSI-X
    // capability past its end indexed past the region (IndexOutOfRangeException, ArgumentOutOfRangeException out of
    // the constructor instead of a log line).
    [Fact]
    public void A_capability_pointer_past_a_short_config_region_ends_the_list()
    {
        var config = new ConfigSpaceBuilder(100)
            .Header(0x1B36, 0x0010, classCode: 0x03, subClass: 0x00, revision: 1, subVendor: 0x1B36, subDevice: 0x10, capabilities: 0x80, pin: 0)
            .Bytes;
        var f = Create(new FakeVfioDevice("short", config).WithBar(0, 4 * KiB).WithIrqs(0, 0, 0), intx: false);
        Assert.Contains(_log, l => l.Contains("capability pointer 0x80 is outside 0x40-0x60", StringComparison.Ordinal));
        Assert.Equal(0u, Read(f, PciConfigSpace.CapabilitiesPointer, 1));
    }

    [Fact]
    public void An_msix_capability_running_past_a_short_config_region_is_hidden()
    {
        var config = new ConfigSpaceBuilder(100)
            .Header(0x1B36, 0x0010, classCode: 0x03, subClass: 0x00, revision: 1, subVendor: 0x1B36, subDevice: 0x10, capabilities: 0x5C, pin: 0)
            .Cap(0x5C, 0x11, 0x00, 0x03, 0x00) // MSI-X, 4 vectors: its 12 bytes end at 0x68, past the 100-byte region
            .Bytes;
        var f = Create(new FakeVfioDevice("short", config).WithBar(0, 4 * KiB).WithIrqs(0, 0, 4), intx: false);
        Assert.Contains(_log, l => l.Contains("MSI-X capability at 0x5c runs past 0x63; hidden", StringComparison.Ordinal));
        Assert.Null(f.Msix);
        Assert.Equal(0u, Read(f, PciConfigSpace.CapabilitiesPointer, 1));
    }
}
