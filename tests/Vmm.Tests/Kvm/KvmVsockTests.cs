using System.Text.RegularExpressions;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Kvm;

/// <summary>virtio-vsock under the stock Debian kernel's own vsock transport (scenario linux-vsock): the host
/// connects to a guest port through vmm's hybrid socket, the guest connects to a host port served on PATH_port,
/// 300000 bytes go each way and come back transformed (guest-images/vsock-peer checks every byte; both ends print
/// the FNV-1a hash of the data, compared here).</summary>
[Collection("kvm")]
public class KvmVsockTests(KvmFixture kvm, Xunit.Abstractions.ITestOutputHelper output)
{
    private const string M = KvmFixture.VsockInitMarker;

    private static string Show(Repo.Result r) => $"exit {r.ExitCode}\n--- stdout\n{r.Stdout}\n--- stderr\n{r.Stderr}";

    /// <summary>The FNV hash on the one line matching <paramref name="pattern"/> (group "fnv").</summary>
    private static string Hash(Repo.Result r, string pattern)
    {
        var match = Regex.Match(r.Stdout, pattern);
        Assert.True(match.Success, $"no line matching {pattern}\n" + Show(r));
        return match.Groups["fnv"].Value;
    }

    [Fact]
    public void Host_and_guest_connect_to_each_other_and_300000_bytes_cross_each_way()
    {
        var r = kvm.Results["linux-vsock"];
        Assert.True(r.ExitCode == 0, Show(r)); // the guest powered off after both exchanges
        Assert.False(r.Stdout.Contains("FAILED"), Show(r));
        Assert.False(r.Stdout.Contains($"{M} insmod"), Show(r));
        Assert.Contains("@@CONNECT 0", r.Stdout);
        Assert.Contains($"{M} done", r.Stdout);

        // Host-initiated: host client -> v.sock "CONNECT 5000" -> guest port 5000.
        string sent = Hash(r, @"vsock-peer: host-connect port 5000: sent 300000 received 300000 fnv (?<fnv>[0-9a-f]{16}) ok");
        string echoed = Hash(r, @"vsock-peer: guest-serve port 5000: echoed 300000 fnv (?<fnv>[0-9a-f]{16})");
        Assert.Equal(sent, echoed);

        // Guest-initiated: guest -> host cid 2 port 7000 -> vmm connects v.sock_7000.
        sent = Hash(r, @"vsock-peer: guest-connect port 7000: sent 300000 received 300000 fnv (?<fnv>[0-9a-f]{16}) ok");
        echoed = Hash(r, @"vsock-peer: host-serve port 7000: echoed 300000 fnv (?<fnv>[0-9a-f]{16})");
        Assert.Equal(sent, echoed);

        Assert.Contains("@@SOCKET GONE", r.Stdout); // vmm removed its listening socket on exit
        foreach (Match line in Regex.Matches(r.Stdout, @"vsock-peer: .*"))
            output.WriteLine(line.Value.TrimEnd()); // the senders' times, for the record
    }
}
