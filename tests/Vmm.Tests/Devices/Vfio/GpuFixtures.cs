using System.Buffers.Binary;
using Vmm.Devices.Vfio;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>Lays out a configuration space byte by byte, as a device's config region holds it.</summary>
public sealed class ConfigSpaceBuilder(int size = 4096)
{
    public byte[] Bytes { get; } = new byte[size];

    public ConfigSpaceBuilder U8(int offset, byte value) { Bytes[offset] = value; return this; }
    public ConfigSpaceBuilder U16(int offset, ushort value) { BinaryPrimitives.WriteUInt16LittleEndian(Bytes.AsSpan(offset), value); return this; }
    public ConfigSpaceBuilder U32(int offset, uint value) { BinaryPrimitives.WriteUInt32LittleEndian(Bytes.AsSpan(offset), value); return this; }

    /// <summary>Type 0 header: IDs, class, status with the capability-list bit when <paramref name="capabilities"/> is not 0.</summary>
    public ConfigSpaceBuilder Header(ushort vendor, ushort device, byte classCode, byte subClass, byte revision,
        ushort subVendor, ushort subDevice, byte capabilities, byte pin)
    {
        U16(0x00, vendor).U16(0x02, device).U8(0x08, revision).U8(0x0A, subClass).U8(0x0B, classCode);
        U16(0x06, (ushort)(capabilities != 0 ? 0x0010 : 0));
        U16(0x2C, subVendor).U16(0x2E, subDevice).U8(0x34, capabilities).U8(0x3D, pin);
        return this;
    }

    public ConfigSpaceBuilder Cap(int offset, byte id, byte next, params byte[] body)
    {
        U8(offset, id).U8(offset + 1, next);
        body.CopyTo(Bytes, offset + 2);
        return this;
    }

    public ConfigSpaceBuilder ExtCap(int offset, ushort id, byte version, int next, params byte[] body)
    {
        U32(offset, id | ((uint)version << 16) | ((uint)next << 20));
        body.CopyTo(Bytes, offset + 4);
        return this;
    }
}

/// <summary>Realistic GPU-like functions for the VFIO PCI model's tests.</summary>
public static class GpuFixtures
{
    public const ulong KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;

    // NVIDIA A100-like: MSI-X table at BAR0 + 0xB90000 (6 vectors), PBA at BAR0 + 0xBA0000, as lspci shows on an A100.
    public const uint A100MsixTable = 0xB9_0000, A100MsixPba = 0xBA_0000;
    public const int A100Pm = 0x60, A100Msi = 0x68, A100Pcie = 0x78, A100Msix = 0xB4, A100Vendor = 0xC8;
    public const ulong A100RomSize = 0x3E000; // not a power of two: the ROM BAR rounds it up to 256 KiB

    /// <summary>Extended capabilities of the A100 fixture, in chain order: (offset, ID).</summary>
    public static readonly (int Offset, ushort Id)[] A100Extended =
    [
        (0x100, 0x02), // Virtual Channel
        (0x128, 0x04), // Power Budgeting
        (0x420, 0x01), // AER
        (0x600, 0x0B), // vendor-specific extended
        (0x900, 0x19), // secondary PCIe
        (0xBB0, 0x15), // Resizable BAR (hidden)
        (0xBCC, 0x10), // SR-IOV (hidden)
        (0xC14, 0x0F), // ATS
    ];

    public static byte[] A100Config()
    {
        var b = new ConfigSpaceBuilder()
            .Header(0x10DE, 0x20B2, classCode: 0x03, subClass: 0x02, revision: 0xA1, subVendor: 0x10DE, subDevice: 0x1463,
                capabilities: A100Pm, pin: 1)
            .U16(0x04, 0x0100)         // SERR# enable left on by firmware: vmm must keep it when forwarding
            .U32(0x10, 0x0000_0000)    // BAR0: 32-bit memory
            .U32(0x14, 0x0000_000C)    // BAR1: 64-bit prefetchable
            .U32(0x1C, 0x0000_000C)    // BAR3: 64-bit prefetchable
            .U32(0x24, 0x0000_0001)    // BAR5: I/O ports
            .Cap(A100Pm, 0x01, A100Msi, 0x03, 0x00, 0x08, 0x00)                        // PM v3, PMCSR NoSoftReset
            .Cap(A100Msi, 0x05, A100Pcie, 0x88, 0x00)                                  // MSI: 16 vectors, 64-bit, no masking
            .Cap(A100Pcie, 0x10, A100Msix, 0x02, 0x00, 0xE1, 0x8F, 0x00, 0x10, 0x30, 0x29, 0x00, 0x00) // PCIe v2 endpoint
            .Cap(A100Msix, 0x11, A100Vendor, 0x05, 0x00)                                // MSI-X: 6 vectors
            .U32(A100Msix + 4, A100MsixTable | 0).U32(A100Msix + 8, A100MsixPba | 0)
            .Cap(A100Vendor, 0x09, 0x00, 0x14, 0x01, 0x00, 0x00, 0x10, 0xDE);          // vendor-specific, 20 bytes
        for (int i = 0; i < A100Extended.Length; i++)
        {
            var (offset, id) = A100Extended[i];
            b.ExtCap(offset, id, 1, i + 1 < A100Extended.Length ? A100Extended[i + 1].Offset : 0);
        }
        b.U32(0x420 + 4, 0x0000_1000); // AER uncorrectable status: poisoned TLP seen
        return b.Bytes;
    }

    public static byte[] A100Rom()
    {
        var rom = new byte[A100RomSize];
        rom[0] = 0x55;
        rom[1] = 0xAA;
        "NVIDIA A100 ROM"u8.CopyTo(rom.AsSpan(4));
        rom[^1] = 0x5A;
        return rom;
    }

    /// <summary>A100-like: BAR0 16 MiB (MSI-X table and PBA inside), BAR1 128 GiB and BAR3 32 MiB 64-bit prefetchable,
    /// BAR5 128 bytes of I/O, a ROM; INTx, 16 MSI, 6 MSI-X vectors.</summary>
    public static FakeVfioDevice A100(bool canReset = true) =>
        new FakeVfioDevice("0000:41:00.0", A100Config(), canReset)
            .WithBar(0, 16 * MiB, new VfioMmapArea(0, 16 * MiB))
            .WithBar(1, 128 * GiB, new VfioMmapArea(0, 128 * GiB))
            .WithBar(3, 32 * MiB, new VfioMmapArea(0, 32 * MiB))
            .WithBar(5, 128)
            .WithRom(A100Rom())
            .WithIrqs(intx: 1, msi: 16, msix: 6);

    public const int MsiOnlyMsi = 0x50;

    /// <summary>A display controller with MSI only (64-bit, per-vector masking, 4 vectors), and SR-IOV as the first
    /// extended capability (hidden, so the header at 0x100 must link on to AER).</summary>
    public static FakeVfioDevice MsiOnly()
    {
        var config = new ConfigSpaceBuilder()
            .Header(0x1B36, 0x7002, classCode: 0x03, subClass: 0x00, revision: 1, subVendor: 0x1B36, subDevice: 0x7002,
                capabilities: 0x40, pin: 1)
            .Cap(0x40, 0x01, MsiOnlyMsi, 0x03, 0x00, 0x00, 0x00)
            .Cap(MsiOnlyMsi, 0x05, 0x70, 0x84, 0x01)   // 4 vectors, 64-bit, maskable
            .Cap(0x70, 0x10, 0x00, 0x02, 0x00)
            .ExtCap(0x100, 0x10, 1, 0x140)             // SR-IOV
            .ExtCap(0x140, 0x01, 2, 0)                 // AER
            .Bytes;
        return new FakeVfioDevice("msi-only", config).WithBar(0, 64 * KiB, new VfioMmapArea(0, 64 * KiB)).WithIrqs(1, 4, 0);
    }

    /// <summary>A conventional PCI function (256-byte config space) with no capabilities, INTB#, one 4 KiB BAR.</summary>
    public static FakeVfioDevice IntxOnly(bool canReset = false)
    {
        var config = new ConfigSpaceBuilder(256)
            .Header(0x8086, 0x1229, classCode: 0x02, subClass: 0x00, revision: 8, subVendor: 0x8086, subDevice: 0x0001,
                capabilities: 0, pin: 2)
            .Bytes;
        return new FakeVfioDevice("intx-only", config, canReset).WithBar(0, 4 * KiB).WithIrqs(1, 0, 0);
    }

    /// <summary>Capability lists that loop: PM → MSI → PM, and AER → AER.</summary>
    public static FakeVfioDevice LoopingChain()
    {
        var config = new ConfigSpaceBuilder()
            .Header(0x1234, 0x0001, classCode: 0xFF, subClass: 0x00, revision: 0, subVendor: 0, subDevice: 0,
                capabilities: 0x40, pin: 0)
            .Cap(0x40, 0x01, 0x50, 0x03, 0x00, 0x00, 0x00)
            .Cap(0x50, 0x05, 0x40, 0x00, 0x00)         // MSI, 32-bit, 1 vector; next points back to PM
            .ExtCap(0x100, 0x01, 2, 0x100)             // AER pointing at itself
            .Bytes;
        return new FakeVfioDevice("looping", config).WithBar(0, 4 * KiB).WithIrqs(0, 1, 0);
    }
}
