using System.Buffers.Binary;
using System.Text;
using Iced.Intel;
using Vmm.Devices.Pci;
using Vmm.Devices.Virtio;
using Vmm.Tests.Devices.Vfio;
using Vmm.Tests.TestKit;
using static Vmm.Interop.VfioUser;

namespace Vmm.Fuzz;

/// <summary>The generated seeds of tools/fuzz/corpus: valid inputs for every target (a real descriptor chain, a real
/// request per device, a driver bring-up, a vfio-user session, an API request, kernel images built with the test
/// kit's ImageBuilder) and a few classic malformed ones. `Vmm.Fuzz --write-seeds tools/fuzz/corpus` rewrites them.</summary>
public static class Seeds
{
    public static void Write(string dir)
    {
        void Put(string target, string name, byte[] bytes)
        {
            Directory.CreateDirectory(Path.Combine(dir, target));
            File.WriteAllBytes(Path.Combine(dir, target, name), bytes);
        }

        // ---- virtqueue: [flags][avail 38][desc 256][data at 0x4000...]
        Put("virtqueue", "two-buffer-chain", Ring(0x40, [0], [(0x4000, 16, 1, 1), (0x4100, 512, 2, 0)]));
        Put("virtqueue", "indirect-chain", Ring(0x41, [0], [(0x4000, 32, 4, 0)],
            Desc(0x4100, 16, 1, 1).Concat(Desc(0x4200, 64, 2, 0)).ToArray()));
        Put("virtqueue", "loop", Ring(0x40, [0], [(0x4000, 16, 1, 1), (0x4100, 16, 1, 0)]));
        Put("virtqueue", "straddles-hole", Ring(0x42, [0, 1], [(0xFF00, 0x200, 0, 0), (0x20000, 0x100, 2, 0)]));

        // ---- devices: [flags][n][desc 256][n heads][data at 0x4000]
        const ulong D = 0x4000;
        byte[] Blk(uint type, ulong sector, uint dataLength, bool dataWritable, byte[]? data = null)
        {
            var req = new byte[0x1000];
            BinaryPrimitives.WriteUInt32LittleEndian(req, type);
            BinaryPrimitives.WriteUInt64LittleEndian(req.AsSpan(8), sector);
            data?.CopyTo(req, 0x200);
            var descs = new List<(ulong, uint, ushort, ushort)> { (D, 16, 1, 1) };
            if (dataLength > 0)
                descs.Add((D + 0x200, dataLength, (ushort)(1 | (dataWritable ? 2 : 0)), 2));
            descs.Add((D + 0xF00, 1, 2, 0));
            if (dataLength == 0)
                descs[0] = (D, 16, 1, 1);
            return Device(0, descs, req);
        }
        Put("virtio-blk", "read", Blk(0, 0, 1024, true));
        Put("virtio-blk", "write", Blk(1, 2, 512, false, Encoding.ASCII.GetBytes("sector two")));
        Put("virtio-blk", "flush", Blk(4, 0, 0, false));
        Put("virtio-blk", "get-id", Blk(8, 0, 20, true));
        var discard = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(discard, 8);
        BinaryPrimitives.WriteUInt32LittleEndian(discard.AsSpan(8), 8);
        Put("virtio-blk", "discard", Blk(11, 0, 16, false, discard));
        Put("virtio-blk", "write-zeroes", Blk(13, 0, 16, false, discard));

        var frame = new byte[12 + 60];
        for (int i = 0; i < 6; i++)
            frame[12 + i] = 0xFF; // broadcast
        frame[12 + 12] = 0x08; // IPv4
        Put("virtio-net", "tx-frame", Device(0, [(D, (uint)frame.Length, 0, 0)], frame));
        Put("virtio-net", "tx-split-header", Device(4, [(D, 6, 1, 1), (D + 6, (uint)frame.Length - 6, 0, 0)], frame));

        Put("virtio-console", "hello", Device(0, [(D, 6, 0, 0)], "hello\n"u8.ToArray()));
        Put("virtio-console", "two-chains", Device(2, [(D, 3, 0, 0), (D + 3, 3, 0, 0)], "abcdef"u8.ToArray(), heads: [0, 1]));

        Put("virtio-vsock", "request", Device(0, [(D, 44, 0, 0)], Vsock(op: 1, dstPort: 1234, length: 0)));
        Put("virtio-vsock", "rw-unknown", Device(0, [(D, 44, 1, 1), (D + 44, 5, 0, 0)], [.. Vsock(op: 5, dstPort: 1234, length: 5), .. "data!"u8]));
        Put("virtio-vsock", "shutdown-rst", Device(0, [(D, 44, 0, 0), (D + 64, 44, 0, 0)],
            [.. Vsock(op: 4, dstPort: 1234, length: 0), .. new byte[20], .. Vsock(op: 3, dstPort: 1234, length: 0)], heads: [0, 1]));

        Put("virtio-rng", "fill", Device(0, [(D, 64, 2, 0)], []));
        var rngTable = new byte[0x100 + 32];
        Desc(D + 0x800, 48, 2, 0).CopyTo(rngTable, 0x100);
        Put("virtio-rng", "indirect", Device(1, [(D, 16, 2, 0), (D + 0x100, 16, 4, 0)], rngTable, heads: [0, 1]));

        // ---- PCI: ops of 8 bytes [op][width][offset u16][value u32]
        var vp = new List<byte>();
        void Op(List<byte> to, byte op, int width, int offset, uint value)
        {
            to.Add(op);
            to.Add((byte)(width switch { 1 => 0, 2 => 1, 4 => 2, _ => 3 }));
            to.Add((byte)offset);
            to.Add((byte)(offset >> 8));
            to.AddRange(BitConverter.GetBytes(value));
        }
        Op(vp, 1, 4, 0, 0);                       // vendor/device id
        Op(vp, 1, 1, 0x34, 0);                    // capability pointer
        Op(vp, 0, 4, 0x10, 0xFFFF_FFFF);          // size BAR0
        Op(vp, 1, 4, 0x10, 0);
        Op(vp, 0, 4, 0x10, 0xC000_0000);          // and put it back
        Op(vp, 2, 1, 0x14, 0);                    // status = 0 (reset)
        Op(vp, 2, 1, 0x14, 1 | 2);                // ACKNOWLEDGE | DRIVER
        Op(vp, 2, 4, 0x00, 1);                    // device_feature_select = 1
        Op(vp, 3, 4, 0x04, 0);                    // device_feature
        Op(vp, 2, 4, 0x08, 1);                    // driver_feature_select = 1
        Op(vp, 2, 4, 0x0C, 1);                    // VERSION_1
        Op(vp, 2, 1, 0x14, 1 | 2 | 8);            // FEATURES_OK
        Op(vp, 2, 2, 0x16, 0);                    // queue_select 0
        Op(vp, 2, 2, 0x18, 16);                   // queue_size
        Op(vp, 2, 2, 0x1A, 0);                    // queue_msix_vector 0
        Op(vp, 2, 4, 0x20, 0x1000);               // queue_desc
        Op(vp, 2, 4, 0x28, 0x2000);               // queue_driver
        Op(vp, 2, 4, 0x30, 0x3000);               // queue_device
        Op(vp, 2, 2, 0x1C, 1);                    // queue_enable
        Op(vp, 2, 1, 0x14, 1 | 2 | 8 | 4);        // DRIVER_OK
        Op(vp, 2, 4, 0x3000, 0);                  // notify queue 0
        Op(vp, 2, 4, 0x4000, 0xFEE0_0000);        // MSI-X entry 0 address
        Op(vp, 2, 4, 0x4008, 0x41);               // data
        Op(vp, 2, 4, 0x400C, 0);                  // unmask
        Op(vp, 3, 1, 0x1000, 0);                  // ISR
        Op(vp, 2, 1, 0x14, 0);                    // reset
        Put("pci-virtio", "driver-bring-up", [.. vp]);
        var msixOn = new List<byte>();
        Op(msixOn, 0, 2, 0x42, 0x8000); // MSI-X enable (first capability at 0x40 in virtio-pci? the fuzzer finds the rest)
        Op(msixOn, 0, 8, 0x10, 0xFFFF_FFFF);
        Put("pci-virtio", "msix-enable-wide", [.. msixOn]);

        var config = GpuFixtures.A100Config();
        var vf = new List<byte>();
        vf.AddRange(BitConverter.GetBytes((ushort)config.Length));
        vf.AddRange(config);
        Op(vf, 1, 4, 0, 0);
        Op(vf, 0, 2, GpuFixtures.A100Msix + 2, 0x8005);          // MSI-X enable
        Op(vf, 2, 4, 0, 0);                                      // BAR0 register write (trapped page)
        Op(vf, 0, 4, 0x10, 0xFFFF_FFFF);                         // size BAR0
        Op(vf, 0, 4, 0x10, 0xC000_0000);
        Op(vf, 0, 2, GpuFixtures.A100Msi + 2, 0x0081);           // MSI enable
        Op(vf, 0, 4, GpuFixtures.A100Msi + 4, 0xFEE0_0000);
        Op(vf, 0, 2, 4, 0x0406);                                 // command: memory, bus master, INTx off
        Op(vf, 1, 4, 0x100, 0);                                  // extended capability chain
        Op(vf, 0, 4, 0x30, 0xFFFF_F801);                         // ROM BAR
        Put("pci-vfio", "a100", [.. vf]);
        var small = new ConfigSpaceBuilder(256).Header(0x8086, 0x1229, 0x02, 0x00, 8, 0x8086, 1, 0x40, 2)
            .Cap(0x40, 0x05, 0x40, 0x84, 0x01).Bytes; // MSI capability whose next pointer loops to itself
        Put("pci-vfio", "looping-msi", [.. BitConverter.GetBytes((ushort)small.Length), .. small]);

        // ---- vfio-user: [mode][length u16][bytes] per reply
        var vu = new List<byte>();
        void Reply(List<byte> to, byte mode, byte[] bytes)
        {
            to.Add(mode);
            to.AddRange(BitConverter.GetBytes((ushort)bytes.Length));
            to.AddRange(bytes);
        }
        Reply(vu, 0, VersionPayload(1, 1 << 20));
        Reply(vu, 0, U32s(16, 3 /* PCI | RESET */, 9, 5));
        for (uint i = 0; i < 9; i++)
        {
            uint flags = i == 7 ? 3u : i == 0 ? 7u : i == 8 ? 1u : 0u; // config rw, BAR0 mmappable rw, VGA r
            ulong size = i == 7 ? 256u : i == 0 ? 0x1000u : i == 8 ? 0x1000u : 0u;
            Reply(vu, (byte)(i == 0 ? 4 : 0), [.. U32s(32, flags, i, 0), .. BitConverter.GetBytes(size), .. BitConverter.GetBytes(0UL)]);
        }
        for (uint i = 0; i < 5; i++)
            Reply(vu, 0, U32s(16, 0, i, i == 4 ? 2u : i == 0 ? 1u : 2u));
        Reply(vu, 0, []); // DMA_MAP
        byte[] Access(ulong offset, uint region, uint count, bool withData) =>
            [.. BitConverter.GetBytes(offset), .. U32s(region, count), .. withData ? new byte[count] : []];
        Reply(vu, 0, Access(0xFF8, 0, 8, true));  // REGION_READ of BAR0's last 8 bytes
        Reply(vu, 0, Access(0, 0, 4, false));     // REGION_WRITE
        Reply(vu, 0, Access(248, 7, 8, true));    // config space
        Reply(vu, 0, Access(0, 7, 4, false));
        Reply(vu, 0, Access(0xFF8, 8, 8, true));  // the read-only region
        Reply(vu, 0, []);                         // SET_IRQS (MSI-X eventfd)
        Reply(vu, 0, []);                         // SET_IRQS (disable)
        Reply(vu, 0, []);                         // DEVICE_RESET
        Reply(vu, 0, []);                         // DMA_UNMAP
        Put("vfio-user", "session", [.. vu]);
        var dma = new List<byte>();
        Reply(dma, 0, VersionPayload(1, 1 << 20));
        Reply(dma, 0, U32s(16, 2, 0, 0));
        Reply(dma, 0, []);
        // A server-initiated DMA_READ of 16 bytes at IOVA 0x100 (command 13, message id 7).
        Reply(dma, 1, [.. BitConverter.GetBytes((ushort)7), .. BitConverter.GetBytes((ushort)13), .. U32s(16 + 16, 0, 0),
            .. BitConverter.GetBytes(0x100UL), .. BitConverter.GetBytes(16UL)]);
        Put("vfio-user", "server-dma", [.. dma]);
        Put("vfio-user", "error-version", [2, 0, 0]);

        // ---- API
        string json = """
            {"cpus":{"boot_vcpus":2,"max_vcpus":2},"memory":{"size":536870912},
             "payload":{"kernel":"/boot/vmlinuz","cmdline":"console=ttyS0","initramfs":"/boot/initrd"},
             "disks":[{"path":"/img/root.raw","readonly":false,"direct":true,"serial":"root"}],
             "net":[{"tap":"tap0","mac":"52:54:00:12:34:56"}],"rng":{"src":"/dev/urandom"},
             "vsock":{"cid":3,"socket":"/run/v.sock"},"devices":[{"path":"/sys/bus/pci/devices/0000:41:00.0","id":"gpu0"}],
             "serial":{"mode":"Tty"},"console":{"mode":"Off"},"platform":{"num_pci_segments":1}}
            """;
        Put("vmconfig", "full", Encoding.UTF8.GetBytes(json));
        Put("vmconfig", "minimal", """{"payload":{"kernel":"/k"}}"""u8.ToArray());
        Put("vmconfig", "wrong-types", """{"payload":{"kernel":7},"cpus":{"boot_vcpus":"two"},"memory":{"size":-1}}"""u8.ToArray());
        Put("http", "ping", "GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"u8.ToArray());
        Put("http", "create", Encoding.UTF8.GetBytes(
            $"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {Encoding.UTF8.GetByteCount(json)}\r\n\r\n{json}"));
        Put("http", "pipelined", "PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /api/v1/vm.info?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n"u8.ToArray());
        Put("http", "chunked", "PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n0\r\n\r\n"u8.ToArray());
        Put("http", "bad-length", "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"u8.ToArray());

        // ---- kernels
        Put("loader-bzimage", "minimal", BzImage(payload: 4096));
        Put("loader-bzimage", "truncated", BzImage(payload: 4096)[..3000]);
        byte[] code64 = ImageBuilder.Guest64(a => { a.mov(AssemblerRegisters.rax, 0x2A); a.hlt(); });
        Put("loader-elf64", "two-segments", ImageBuilder.Elf(true, 0x20_0000,
            [new(0x20_0000, code64), new(0x30_0000, new byte[64], MemorySize: 0x2000)]));
        Put("loader-elf64", "high-vaddr", ImageBuilder.Elf(true, 0xFFFF_FFFF_8100_0000,
            [new(0x100_0000, code64, VirtualAddress: 0xFFFF_FFFF_8100_0000)]));
        var pvhNote = ImageBuilder.Note("Xen", 18, BitConverter.GetBytes(0x20_0000u));
        Put("loader-pvh", "pvh64", ImageBuilder.Elf(true, 0xFFFF_FFFF_8100_0000, [new(0x20_0000, code64)], pvhNote));
        Put("loader-pvh", "pvh32", ImageBuilder.Elf(false, 0x20_0000, [new(0x20_0000, new byte[] { 0xF4 })], pvhNote));
        byte[] code32 = ImageBuilder.Guest32(a => a.hlt());
        Put("loader-multiboot", "aout-kludge", ImageBuilder.AoutKludge(0x10_0000, code32, bssSize: 0x1000));
        Put("loader-multiboot", "elf32", ImageBuilder.Elf(false, 0x10_0000,
            [new(0x10_0000, [.. ImageBuilder.MultibootHeaderBytes(), .. code32])]));
    }

    private static byte[] U32s(params uint[] values) => [.. values.SelectMany(BitConverter.GetBytes)];

    private static byte[] Desc(ulong address, uint length, ushort flags, ushort next)
    {
        var d = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(d, address);
        BinaryPrimitives.WriteUInt32LittleEndian(d.AsSpan(8), length);
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(12), flags);
        BinaryPrimitives.WriteUInt16LittleEndian(d.AsSpan(14), next);
        return d;
    }

    /// <summary>A virtqueue-target input: the heads published, descriptors 0.. as given, data at 0x4000.</summary>
    private static byte[] Ring(byte flags, ushort[] heads, (ulong, uint, ushort, ushort)[] descs, byte[]? data = null)
    {
        var avail = new byte[38];
        BinaryPrimitives.WriteUInt16LittleEndian(avail.AsSpan(2), (ushort)heads.Length);
        for (int i = 0; i < heads.Length; i++)
            BinaryPrimitives.WriteUInt16LittleEndian(avail.AsSpan(4 + 2 * i), heads[i]);
        var table = new byte[256];
        for (int i = 0; i < descs.Length; i++)
            Desc(descs[i].Item1, descs[i].Item2, descs[i].Item3, descs[i].Item4).CopyTo(table, 16 * i);
        return [flags, .. avail, .. table, .. data ?? []];
    }

    /// <summary>A device-target input: descriptors 0.., heads (default: one chain from 0), data at 0x4000.</summary>
    private static byte[] Device(byte flags, IList<(ulong, uint, ushort, ushort)> descs, byte[] data, ushort[]? heads = null)
    {
        heads ??= [0];
        var table = new byte[256];
        for (int i = 0; i < descs.Count; i++)
            Desc(descs[i].Item1, descs[i].Item2, descs[i].Item3, descs[i].Item4).CopyTo(table, 16 * i);
        return [flags, (byte)heads.Length, .. table, .. heads.SelectMany(h => BitConverter.GetBytes(h)), .. data];
    }

    /// <summary>virtio_vsock_hdr (44 bytes): guest cid 3 to host cid 2, stream.</summary>
    private static byte[] Vsock(ushort op, uint dstPort, uint length)
    {
        var h = new byte[44];
        BinaryPrimitives.WriteUInt64LittleEndian(h, 3);
        BinaryPrimitives.WriteUInt64LittleEndian(h.AsSpan(8), 2);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(16), 50000);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(20), dstPort);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(24), length);
        BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(28), 1); // VIRTIO_VSOCK_TYPE_STREAM
        BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(30), op);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(36), 65536); // buf_alloc
        return h;
    }

    /// <summary>A bzImage as small as the loader accepts: setup header (boot protocol 2.15, LOADED_HIGH, 64-bit
    /// entry, relocatable), four setup sectors, <paramref name="payload"/> bytes of protected-mode kernel.</summary>
    private static byte[] BzImage(int payload)
    {
        const int setup = 5 * 512;
        var b = new byte[setup + payload];
        b[0x1F1] = 4;                                                        // setup_sects
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(0x1F4), (uint)payload / 16); // syssize
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(0x1FE), 0xAA55);
        "HdrS"u8.CopyTo(b.AsSpan(0x202));
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(0x206), 0x020F);
        b[0x211] = 1;                                                        // LOADED_HIGH
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(0x22C), 0x7FFF_FFFF); // initrd_addr_max
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(0x230), 0x20_0000);   // kernel_alignment
        b[0x234] = 1;                                                        // relocatable
        BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(0x236), 1);         // XLF_KERNEL_64
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(0x238), 2048);      // cmdline_size
        BinaryPrimitives.WriteUInt64LittleEndian(b.AsSpan(0x258), 0x100_0000); // pref_address
        BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(0x260), 0x10_0000);  // init_size
        return b;
    }
}
