using System.Globalization;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using Vmm.Interop;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Vfio;

/// <summary>The vfio-user payloads that reuse kernel structs (the spec says so) must match &lt;linux/vfio.h&gt;:
/// a gcc probe prints their sizes, field offsets and the flag values, compared with src/Vmm.Interop/VfioUser.cs.
/// The vfio_user_* structs exist only in the spec: their sizes are the spec's tables.</summary>
public class VfioUserAbiTests
{
    private static readonly Type[] KernelStructs =
    [
        typeof(vfio_region_info), typeof(vfio_info_cap_header), typeof(vfio_region_info_cap_sparse_mmap),
        typeof(vfio_region_sparse_mmap_area), typeof(vfio_irq_info), typeof(vfio_irq_set),
    ];

    [Fact]
    public void Kernel_derived_structs_and_flags_match_linux_vfio_h()
    {
        var body = new StringBuilder();
        foreach (var t in KernelStructs)
        {
            body.AppendLine(CultureInfo.InvariantCulture, $"printf(\"size {t.Name} %zu\\n\", sizeof(struct {t.Name}));");
            foreach (var f in t.GetFields())
                body.AppendLine(CultureInfo.InvariantCulture, $"printf(\"offset {t.Name}.{f.Name} %zu\\n\", offsetof(struct {t.Name}, {f.Name}));");
        }
        var constants = typeof(VfioUser).GetFields(BindingFlags.Public | BindingFlags.Static)
            .Where(f => f.IsLiteral && f.Name.StartsWith("VFIO_", StringComparison.Ordinal) && !f.Name.StartsWith("VFIO_USER_", StringComparison.Ordinal))
            .ToList();
        Assert.Contains(constants, f => f.Name == "VFIO_IRQ_SET_ACTION_TRIGGER");
        foreach (var f in constants)
            body.AppendLine(CultureInfo.InvariantCulture, $"printf(\"const {f.Name} %llu\\n\", (unsigned long long)({f.Name}));");

        var c = Probe(body.ToString());
        var mismatches = new List<string>();
        foreach (var t in KernelStructs)
        {
            if (c[$"size {t.Name}"] != (ulong)Marshal.SizeOf(t))
                mismatches.Add($"sizeof({t.Name}) C {c[$"size {t.Name}"]}, C# {Marshal.SizeOf(t)}");
            foreach (var f in t.GetFields())
            {
                ulong managed = (ulong)Marshal.OffsetOf(t, f.Name).ToInt64();
                if (c[$"offset {t.Name}.{f.Name}"] != managed)
                    mismatches.Add($"{t.Name}.{f.Name}: offset C {c[$"offset {t.Name}.{f.Name}"]}, C# {managed}");
            }
        }
        foreach (var f in constants)
        {
            ulong managed = Convert.ToUInt64(f.GetRawConstantValue(), CultureInfo.InvariantCulture);
            if (c[$"const {f.Name}"] != managed)
                mismatches.Add($"{f.Name}: C {c[$"const {f.Name}"]}, C# {managed}");
        }
        Assert.True(mismatches.Count == 0, string.Join("\n", mismatches));
    }

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

    private static Dictionary<string, ulong> Probe(string body)
    {
        var dir = Directory.CreateTempSubdirectory("vfio-user-abi-");
        try
        {
            string c = Path.Combine(dir.FullName, "probe.c"), exe = Path.Combine(dir.FullName, "probe");
            File.WriteAllText(c, $"#include <stddef.h>\n#include <stdio.h>\n#include <linux/vfio.h>\nint main(void)\n{{\n{body}return 0;\n}}\n");
            var cc = Repo.Run("gcc", ["-std=gnu11", "-Wall", "-Werror", "-o", exe, c], dir.FullName, TimeSpan.FromMinutes(2));
            Assert.True(cc.ExitCode == 0, $"the probe does not compile against <linux/vfio.h>:\n{cc.Stderr}");
            var run = Repo.Run(exe, [], dir.FullName, TimeSpan.FromMinutes(1));
            Assert.Equal(0, run.ExitCode);
            return run.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries)
                .Select(l => (Key: l[..l.LastIndexOf(' ')], Value: ulong.Parse(l[(l.LastIndexOf(' ') + 1)..], CultureInfo.InvariantCulture)))
                .ToDictionary(p => p.Key, p => p.Value);
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}
