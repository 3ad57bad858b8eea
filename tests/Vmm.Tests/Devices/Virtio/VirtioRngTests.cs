using Vmm.Devices.Virtio;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

public sealed class VirtioRngTests : IDisposable
{
    private readonly VirtioRng _rng = new();
    private readonly VirtioDeviceHarness _h;

    public VirtioRngTests()
    {
        _h = new VirtioDeviceHarness(_rng.DeviceFeatures);
        _rng.Activate(_h.Context);
    }

    public void Dispose()
    {
        _rng.Dispose();
        _h.Dispose();
    }

    [Fact]
    public void Random_bytes_arrive_differ_between_requests_and_the_used_length_is_right()
    {
        ulong a = _h.Alloc(256), b = _h.Alloc(256);
        Assert.Equal(256u, _h.Submit(new VirtqBuffer(a, 256, true)).Length);
        Assert.Equal(256u, _h.Submit(new VirtqBuffer(b, 256, true)).Length);
        byte[] first = _h.ReadBytes(a, 256), second = _h.ReadBytes(b, 256);
        Assert.NotEqual(first, second);
        Assert.True(first.Distinct().Count() > 64, "256 random bytes hold many distinct values");
        Assert.True(_h.Interrupts.QueueInterrupts >= 2);
    }

    [Fact]
    public void Readable_buffers_are_ignored_and_writable_ones_filled()
    {
        ulong input = _h.Place(new byte[64]), out1 = _h.Alloc(100), out2 = _h.Alloc(28);
        Assert.Equal(128u, _h.Submit(new(input, 64, false), new(out1, 100, true), new(out2, 28, true)).Length);
        Assert.All(_h.ReadBytes(input, 64), x => Assert.Equal(0, x));
        Assert.Contains(_h.ReadBytes(out2, 28), x => x != 0);
    }

    [Fact]
    public void Requests_are_capped_and_chains_without_writable_buffers_get_nothing()
    {
        ulong big = _h.Alloc(128 * 1024);
        Assert.Equal((uint)VirtioRng.MaxRequestBytes, _h.Submit(new VirtqBuffer(big, 128 * 1024, true)).Length);
        Assert.All(_h.ReadBytes(big + VirtioRng.MaxRequestBytes, 64 * 1024), x => Assert.Equal(0, x));
        Assert.Equal(0u, _h.Submit(new VirtqBuffer(_h.Alloc(16), 16, false)).Length);
        Assert.Equal(0u, _h.Submit(new VirtqBuffer(VirtioDeviceHarness.RamSize, 16, true)).Length); // outside RAM
        Assert.Equal(32u, _h.Submit(new VirtqBuffer(_h.Alloc(32), 32, true)).Length);
        Assert.Equal(VirtioDeviceType.Entropy, _rng.Type);
        Assert.Equal(0, _rng.ConfigSize);
    }
}
