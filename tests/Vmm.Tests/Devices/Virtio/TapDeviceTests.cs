using Vmm.Devices.Virtio.Net;
using Vmm.Interop;
using Vmm.Tests.Abi;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

public sealed class TapDeviceTests
{
    [Fact]
    public void Every_TunConstants_value_equals_its_if_tun_h_macro()
    {
        var mismatches = AbiProbe.CompareConstants(typeof(TunConstants), "linux/if_tun.h");

        Assert.True(mismatches.Count == 0,
            $"{mismatches.Count} mismatch(es) between TunConstants and <linux/if_tun.h>:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void A_new_tap_gets_the_requested_name_and_a_non_blocking_fd()
    {
        using var tap = NetNamespace.Run(() => new TapDevice("vmmtap7"));

        Assert.Equal("vmmtap7", tap.Name);
        Span<byte> buffer = stackalloc byte[2048];
        Assert.Equal(-Errno.EAGAIN, Uio.Read(tap.Fd, buffer)); // nothing to read, and it does not block
    }

    [Fact]
    public void A_tap_that_is_already_open_is_reported_as_in_use()
    {
        var (first, error) = NetNamespace.Run(() =>
        {
            var tap = new TapDevice("vmmbusy0");
            return (tap, Assert.Throws<TapException>(() => new TapDevice("vmmbusy0")));
        });
        using (first)
        {
            Assert.Equal(Errno.EBUSY, error.ErrorNumber);
            Assert.Contains("in use", error.Message);
        }
    }

    [Fact]
    public void An_existing_persistent_tap_is_attached()
    {
        using var tap = NetNamespace.Run(() =>
        {
            using (var creator = new TapDevice("vmmpers0"))
                Assert.Equal(0, Tun.SetPersist(creator.Fd, true));
            var attached = new TapDevice("vmmpers0"); // the interface outlived its creator's fd
            Assert.Equal(0, Tun.SetPersist(attached.Fd, false)); // and goes away with this one
            return attached;
        });

        Assert.Equal("vmmpers0", tap.Name);
    }

    [Theory]
    [InlineData("")]
    [InlineData("a-name-longer-than-15")]
    [InlineData("has/slash")]
    [InlineData("has space")]
    [InlineData("..")]
    public void Invalid_interface_names_are_refused_before_any_system_call(string name)
    {
        var e = Assert.Throws<ArgumentException>(() => new TapDevice(name));
        Assert.Contains("not a valid interface name", e.Message);
    }
}
