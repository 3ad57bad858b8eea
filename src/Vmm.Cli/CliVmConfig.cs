using Vmm.Api;
using Vmm.Machine;

namespace Vmm.Cli;

/// <summary>The command line's VM flags as the one configuration model, Cloud Hypervisor's VmConfig: `vmm run` and
/// `vmm run --config` and vm.create all boot from a VmConfig, and vm.info shows it.</summary>
public static class CliVmConfig
{
    /// <summary>The kernel name the demo guest goes by (its image is built in, not read from a file).</summary>
    public const string DemoKernel = "vmm-demo";

    public static VmConfig From(Options o)
    {
        var serial = o.Serial switch
        {
            SerialMode.Stdio => new ConsoleConfig { Mode = "Tty" },
            SerialMode.File => new ConsoleConfig { Mode = "File", File = o.SerialPath },
            _ => new ConsoleConfig { Mode = "Off" },
        };
        // --console virtio: the virtio-console port shares the UART's output (one console sink).
        var console = !o.VirtioConsole ? new ConsoleConfig { Mode = "Off" }
            : serial.Mode == "Off" ? new ConsoleConfig { Mode = "Null" }
            : new ConsoleConfig { Mode = serial.Mode, File = serial.File };
        bool p2p = o.Devices.Any(d => d.PeerToPeer);
        return new VmConfig
        {
            Payload = new PayloadConfig
            {
                Kernel = o.Demo ? DemoKernel : o.Kernel,
                Initramfs = o.Initrd,
                Cmdline = o.Cmdline.Length > 0 ? o.Cmdline : null,
            },
            Cpus = new CpusConfig { BootVcpus = o.Cpus, MaxVcpus = o.Cpus },
            Memory = new MemoryConfig { Size = checked((long)o.Memory) },
            Disks = o.Disks.Count == 0 ? null : o.Disks.Select(d => d.VhostSocket is null ? new Api.DiskConfig
            {
                Path = d.Path,
                Readonly = d.ReadOnly,
                Direct = d.Direct,
                Serial = d.Serial,
                Id = d.Id,
            } : new Api.DiskConfig
            {
                VhostUser = true,
                VhostSocket = d.VhostSocket,
                NumQueues = d.NumQueues,
                QueueSize = d.QueueSize,
                Id = d.Id,
            }).ToList(),
            Fs = o.Fs.Count == 0 ? null : o.Fs.Select(f => new Api.FsConfig
            {
                Tag = f.Tag,
                Socket = f.Socket,
                NumQueues = f.NumQueues,
                QueueSize = f.QueueSize,
                Id = f.Id,
            }).ToList(),
            Net = o.Nets.Count == 0 ? null : o.Nets.Select(n => new Api.NetConfig
            {
                Tap = n.Tap,
                Mac = n.Mac is null ? null : string.Join(':', n.Mac.Select(b => b.ToString("x2"))),
                Id = n.Id,
            }).ToList(),
            Rng = o.Rng ? new RngConfig { Src = VmConfigMapper.DefaultRngSource } : null,
            Vsock = o.Vsock is { } v ? new Api.VsockConfig { Cid = (long)v.Cid, Socket = v.Socket, Id = v.Id } : null,
            Serial = serial,
            Console = console,
            Devices = o.Devices.Any(d => d.Kind == PassthroughKind.Vfio)
                ? o.Devices.Where(d => d.Kind == PassthroughKind.Vfio).Select(d => new DeviceConfig { Path = d.Path, Id = d.Id }).ToList() : null,
            UserDevices = o.Devices.Any(d => d.Kind == PassthroughKind.VfioUser)
                ? o.Devices.Where(d => d.Kind == PassthroughKind.VfioUser).Select(d => new UserDeviceConfig { Socket = d.Path, Id = d.Id }).ToList() : null,
            // p2p=on on any --device turns on peer-to-peer DMA for the passed-through devices (CH's platform-wide
            // vfio_p2p_dma); without it vmm keeps it off, since mapping large BARs for DMA slows start-up.
            Platform = o.Devices.Count > 0 ? new PlatformConfig { VfioP2pDma = p2p } : null,
            PciSegments = o.Mmio64Weight is int w ? [new PciSegmentConfig { PciSegment = 0, Mmio64ApertureWeight = w }] : null,
        };
    }
}
