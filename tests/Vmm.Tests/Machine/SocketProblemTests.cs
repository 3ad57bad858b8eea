using System.Net.Sockets;
using Vmm.Machine;

namespace Vmm.Tests.Machine;

/// <summary>The one check of a back-end socket that cold plug (MachineConfig.Validate) and hotplug
/// (DeviceManager.HotPlug) share: a stat, one line naming the option, nothing that can block.</summary>
public sealed class SocketProblemTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vmm-socket-problem-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Each_kind_of_back_end_names_its_option_and_what_the_path_is()
    {
        string file = Path.Combine(_dir, "file"), missing = Path.Combine(_dir, "missing");
        File.WriteAllText(file, "not a socket");
        Assert.Equal($"--disk vhost_user=on,socket={file}: is a regular file, not a socket",
            MachineConfig.SocketProblem(new DiskConfig("") { VhostSocket = file }));
        Assert.Equal($"--fs tag=share,socket={_dir}: is a directory", MachineConfig.SocketProblem(new FsConfig("share", _dir)));
        Assert.Equal($"--device vfio-user={missing}: no such socket (start the vfio-user server first)",
            MachineConfig.SocketProblem(new PassthroughConfig(PassthroughKind.VfioUser, missing)));
        Assert.Equal($"--fs tag=share,socket={missing}: no such socket (start virtiofsd --socket-path={missing} first)",
            MachineConfig.SocketProblem(new FsConfig("share", missing)));
    }

    [Fact]
    public void A_listening_socket_and_devices_without_a_back_end_socket_pass()
    {
        string path = Path.Combine(_dir, "be.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen();
        Assert.Null(MachineConfig.SocketProblem(new DiskConfig("") { VhostSocket = path }));
        Assert.Null(MachineConfig.SocketProblem(new FsConfig("share", path)));
        Assert.Null(MachineConfig.SocketProblem(new PassthroughConfig(PassthroughKind.VfioUser, path)));
        // An image served by vmm, a tap, a kernel VFIO device: no socket to check here.
        Assert.Null(MachineConfig.SocketProblem(new DiskConfig(Path.Combine(_dir, "missing.img"))));
        Assert.Null(MachineConfig.SocketProblem(new NetConfig("tap0")));
        Assert.Null(MachineConfig.SocketProblem(new PassthroughConfig(PassthroughKind.Vfio, _dir)));
    }
}
