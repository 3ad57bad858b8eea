using Vmm.Devices.Pci;
using Vmm.Devices.Virtio;
using Vmm.Interop;

namespace Vmm.Tests.TestKit;

/// <summary>An MSI controller whose vectors log every Configure, Trigger and SetMasked, in order, into one list.
/// Each vector owns a real eventfd (what a passed-through device signals); it is pending while masked and signalled.</summary>
public sealed class RecordingMsiController : IMsiController
{
    public List<string> Log { get; } = [];
    public List<RecordingMsiVector> Vectors { get; } = [];

    public IMsiVector CreateVector(string owner, int index)
    {
        var v = new RecordingMsiVector(this, index);
        Vectors.Add(v);
        return v;
    }

    public sealed class RecordingMsiVector(RecordingMsiController controller, int index) : IMsiVector
    {
        public int Index { get; } = index;
        public EventFd EventFd { get; } = new();
        public bool Masked { get; private set; }
        public int Triggers { get; private set; }
        public (ulong Address, uint Data)? Message { get; private set; }

        public void Configure(ulong address, uint data)
        {
            Message = (address, data);
            lock (controller.Log)
                controller.Log.Add($"configure {Index} 0x{address:x} 0x{data:x}");
        }

        public void Trigger()
        {
            Triggers++;
            lock (controller.Log)
                controller.Log.Add($"trigger {Index}");
        }

        public void SetMasked(bool masked)
        {
            Masked = masked;
            lock (controller.Log)
                controller.Log.Add($"{(masked ? "mask" : "unmask")} {Index}");
        }

        public bool IsPending
        {
            get
            {
                Span<int> fds = [EventFd.Fd];
                Span<bool> ready = [false];
                return Masked && EventFd.Poll(fds, ready, 0) > 0;
            }
        }
    }
}

/// <summary>Records ioeventfd registrations as "+0xADDR/len" and "-0xADDR/len".</summary>
public sealed class RecordingIoEventRegistrar : IIoEventRegistrar
{
    public List<string> Log { get; } = [];
    public Dictionary<(ulong Address, uint Length), EventFd> Registered { get; } = [];

    public void Register(EventFd eventFd, ulong address, uint length)
    {
        Log.Add($"+0x{address:x}/{length}");
        Assert.True(Registered.TryAdd((address, length), eventFd), $"0x{address:x}/{length} registered twice");
    }

    public void Unregister(EventFd eventFd, ulong address, uint length)
    {
        Log.Add($"-0x{address:x}/{length}");
        Assert.True(Registered.Remove((address, length), out var fd), $"0x{address:x}/{length} was not registered");
        Assert.Same(fd, eventFd);
    }
}

/// <summary>A PCI function with whatever BARs a test declares; records BAR accesses and BarMapped calls. BAR
/// reads return the low byte of the offset in every byte.</summary>
public sealed class RecordingPciFunction : PciFunction
{
    public RecordingPciFunction(string name = "test", ushort vendorId = 0x1234, ushort deviceId = 0x5678)
        : base(new PciConfigSpace(vendorId, deviceId, classCode: 0xFF, subClass: 0x00, progIf: 0x00, revision: 7,
            subsystemVendorId: 0xABCD, subsystemId: 0xEF01)) => Name = name;

    public override string Name { get; }
    public List<string> Accesses { get; } = [];
    public List<(int Bar, ulong? Address)> Mapped { get; } = [];

    public override void BarRead(int bar, ulong offset, Span<byte> data)
    {
        Accesses.Add($"r{data.Length} bar{bar}+0x{offset:x}");
        data.Fill((byte)offset);
    }

    public override void BarWrite(int bar, ulong offset, ReadOnlySpan<byte> data) =>
        Accesses.Add($"w{data.Length} bar{bar}+0x{offset:x}={Convert.ToHexString(data)}");

    public override void BarMapped(int bar, ulong? address) => Mapped.Add((bar, address));
}
