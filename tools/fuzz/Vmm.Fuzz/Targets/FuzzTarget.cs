using System.Buffers.Binary;

namespace Vmm.Fuzz;

/// <summary>A broken invariant: the input made vmm do something it promises never to do (touch memory outside guest
/// RAM, let an undocumented exception out of a device or parser, hang). Escapes <see cref="IFuzzTarget.Run"/>, so
/// afl-fuzz records the input as a crash and the corpus replay test fails.</summary>
public sealed class FuzzInvariantException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>One fuzz target: set up once per process (guest memory, a device, a server), then fed input after
/// input. <see cref="Run"/> catches exactly the exceptions that are the component's documented "clear error" for bad
/// input; anything else escapes and is a finding.</summary>
public interface IFuzzTarget : IDisposable
{
    void Run(ReadOnlySpan<byte> input);
}

/// <summary>Every target, by the name tools/fuzz/run.sh and the corpus directories use.</summary>
public static class FuzzTargets
{
    public sealed record Entry(string Name, string Description, Func<IFuzzTarget> Create);

    public static IReadOnlyList<Entry> All { get; } =
    [
        new("virtqueue", "split-virtqueue walk: descriptor chains (loops, indirect tables, out-of-RAM buffers, lengths) over two RAM regions with a hole", () => new VirtqueueTarget()),
        new("virtio-blk", "virtio-blk request queue: request headers, data and status buffers against a 1 MiB image", () => new VirtioDeviceTarget(VirtioDeviceTarget.Kind.Block)),
        new("virtio-net", "virtio-net transmit queue: virtio_net_hdr and frames written to a tap in a private network namespace (root)", () => new VirtioDeviceTarget(VirtioDeviceTarget.Kind.Net)),
        new("virtio-console", "virtio-console transmit queue", () => new VirtioDeviceTarget(VirtioDeviceTarget.Kind.Console)),
        new("virtio-vsock", "virtio-vsock transmit queue: packet headers, operations, credit, connection setup to host sockets", () => new VirtioDeviceTarget(VirtioDeviceTarget.Kind.Vsock)),
        new("virtio-rng", "virtio-rng request queue (writable buffers only)", () => new VirtioDeviceTarget(VirtioDeviceTarget.Kind.Rng)),
        new("pci-virtio", "guest config-space and BAR writes to a virtio-pci function (common config, queue setup, MSI-X table, DRIVER_OK)", () => new PciVirtioTarget()),
        new("pci-vfio", "a VFIO device's config space as the device presents it, then guest config-space and BAR accesses to its VfioPciFunction", () => new PciVfioTarget()),
        new("vfio-user", "vfio-user client: the server's replies (version, device, region and IRQ info, region data, server-initiated DMA)", () => new VfioUserTarget()),
        new("http", "the API's HTTP/1.1 request parsing (request line, headers, bodies, keep-alive), vm.create bodies parsed as VmConfig", () => new HttpTarget()),
        new("vmconfig", "VmConfig JSON (vm.create, --config) parsed, normalized and checked", () => new VmConfigTarget()),
        new("loader-bzimage", "Linux bzImage loader: setup header, sizes, initrd placement, command line", () => new LoaderTarget(LoaderTarget.Kind.BzImage)),
        new("loader-pvh", "PVH ELF loader: ELF headers, program headers, the Xen PVH note", () => new LoaderTarget(LoaderTarget.Kind.Pvh)),
        new("loader-multiboot", "multiboot v1 loader: the header search, a.out-kludge address fields, ELF32 segments, module", () => new LoaderTarget(LoaderTarget.Kind.Multiboot)),
        new("loader-elf64", "64-bit ELF loader: headers and segments, entered in long mode", () => new LoaderTarget(LoaderTarget.Kind.Elf64)),
    ];

    private static readonly bool s_explain = Environment.GetEnvironmentVariable("VMM_FUZZ_EXPLAIN") == "1";

    /// <summary>Documented refusals on this thread so far: the replay test checks that a valid seed is not refused.</summary>
    [ThreadStatic] private static int t_refusals;
    public static int Refusals => t_refusals;

    /// <summary>Counts a documented refusal and, with VMM_FUZZ_EXPLAIN=1, says on stderr how the input ended (to check
    /// that a seed gets as far as it should).</summary>
    public static void Explain(string what)
    {
        t_refusals++;
        if (s_explain)
            Console.Error.WriteLine("  " + what);
    }

    public static Entry Find(string name) =>
        All.FirstOrDefault(t => t.Name == name)
        ?? throw new ArgumentException($"no fuzz target '{name}' (targets: {string.Join(", ", All.Select(t => t.Name))})");
}

/// <summary>Reads a fuzz input front to back; past its end every read gives zeroes, so any input is a valid one.</summary>
public ref struct FuzzReader(ReadOnlySpan<byte> data)
{
    private readonly ReadOnlySpan<byte> _data = data;
    private int _at;

    public readonly int Remaining => Math.Max(0, _data.Length - _at);
    public readonly bool AtEnd => _at >= _data.Length;

    public byte U8() => _at < _data.Length ? _data[_at++] : (byte)0;

    public ushort U16() => (ushort)(U8() | (U8() << 8));

    public uint U32() => U16() | ((uint)U16() << 16);

    public ulong U64() => U32() | ((ulong)U32() << 32);

    /// <summary>Up to <paramref name="length"/> bytes (fewer at the end).</summary>
    public ReadOnlySpan<byte> Bytes(int length)
    {
        int n = Math.Min(length, Remaining);
        var s = _data.Slice(Math.Min(_at, _data.Length), n);
        _at += n;
        return s;
    }

    public ReadOnlySpan<byte> Rest() => Bytes(Remaining);

    public static void Put16(Span<byte> b, int at, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(b[at..], v);
}
