using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Devices.Virtio;

/// <summary>virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue, no features, no configuration.
/// Each request's device-writable buffers are filled from the host CSPRNG, at most <see cref="MaxRequestBytes"/> a
/// request so one request cannot keep the worker busy; device-readable buffers are ignored.</summary>
public sealed class VirtioRng : VirtioDevice
{
    public const int MaxRequestBytes = 64 * 1024;

    private readonly Lock _lifecycle = new();
    private VirtioContext? _context;

    public override VirtioDeviceType Type => VirtioDeviceType.Entropy;

    public override string Name => "virtio-rng";

    public override (byte Class, byte SubClass) PciClass => (0xFF, 0x00); // unclassified, as QEMU

    public override ulong DeviceFeatures => 0;

    public override int QueueCount => 1;

    public override int ConfigSize => 0;

    public override void ReadConfig(int offset, Span<byte> data) => data.Clear();

    public override void Activate(VirtioContext context)
    {
        lock (_lifecycle)
        {
            if (Worker is not null)
                throw new InvalidOperationException("virtio-rng is already active");
            _context = context;
            Worker = new VirtioWorker("virtio-rng", context.Kicks, ServeQueue);
        }
    }

    public override void Deactivate()
    {
        lock (_lifecycle)
        {
            Worker?.Dispose();
            Worker = null;
            _context = null;
        }
    }

    public override void Dispose()
    {
        Deactivate();
        base.Dispose();
    }

    // Cached: a method group converted per call would allocate a delegate on every kick.
    private ChainHandler? _handler;

    private void ServeQueue(int index) => _context!.ServeQueue(index, _handler ??= (memory, chain) => Fill(memory, chain.Writable));

    private static uint Fill(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> writable)
    {
        int written = 0;
        foreach (var buffer in writable)
        {
            int n = (int)Math.Min(buffer.Length, (uint)(MaxRequestBytes - written));
            if (n == 0)
                continue;
            if (!memory.TryGetSpan(new GuestAddress(buffer.Address), n, out var span))
                break;
            Sys.GetRandom(span); // the host CSPRNG, without OpenSSL
            written += n;
            if (written == MaxRequestBytes)
                break;
        }
        return (uint)written;
    }
}
