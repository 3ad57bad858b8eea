using System.Globalization;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using Vmm.Interop;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>The vfio-user payloads that reuse kernel structs (the spec says so) are the same C# types and constants the
/// kernel backend uses, checked against &lt;linux/vfio.h&gt; by VfioAbiTests.
/// The vfio_user_* structs exist only in the spec: their sizes are the spec's tables.</summary>
public class VfioUserAbiTests
{
    [Fact]
    public void Spec_only_structs_have_the_sizes_of_the_spec_tables()
    {
        Assert.Equal(16, Marshal.SizeOf<VfioUser.vfio_user_header>());
        Assert.Equal(4, Marshal.SizeOf<VfioUser.vfio_user_version>());
        Assert.Equal(32, Marshal.SizeOf<VfioUser.vfio_user_dma_map>());
        Assert.Equal(24, Marshal.SizeOf<VfioUser.vfio_user_dma_unmap>());
        Assert.Equal(16, Marshal.SizeOf<VfioUser.vfio_user_device_info>());
        Assert.Equal(16, Marshal.SizeOf<VfioUser.vfio_user_region_access>());
        Assert.Equal(16, Marshal.SizeOf<VfioUser.vfio_user_dma_region_access>());
        Assert.Equal(8, Marshal.OffsetOf<VfioUser.vfio_user_header>("flags").ToInt32());
        Assert.Equal(16, Marshal.OffsetOf<VfioUser.vfio_user_dma_map>("address").ToInt32());
    }

    [Fact]
    public void Version_payload_round_trips_and_bad_json_is_an_error_not_an_exception()
    {
        Assert.True(VfioUser.TryParseVersion(VfioUser.VersionPayload(8, 65536), out var v, out _));
        Assert.Equal(new VfioUserVersionInfo(0, 1, 8, 65536), v);
        Assert.True(VfioUser.TryParseVersion([0, 0, 1, 0], out var bare, out _)); // no JSON: the spec's defaults
        Assert.Equal((1, 1024U * 1024), (bare.MaxMsgFds, bare.MaxDataXferSize));
        foreach (string bad in new[] { "{", "[]", "{\"capabilities\":1}", "{\"capabilities\":{\"max_msg_fds\":\"x\"}}",
                     "{\"capabilities\":{\"max_data_xfer_size\":0}}", "{\"capabilities\":{\"max_msg_fds\":-1}}" })
        {
            byte[] payload = [0, 0, 1, 0, .. Encoding.UTF8.GetBytes(bad), 0];
            Assert.False(VfioUser.TryParseVersion(payload, out _, out string? error), bad);
            Assert.False(string.IsNullOrEmpty(error));
        }
        Assert.False(VfioUser.TryParseVersion([0, 0], out _, out _));
    }

}
