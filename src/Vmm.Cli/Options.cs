using System.Globalization;
using Vmm.Interop.Seccomp;
using Vmm.Machine;

namespace Vmm.Cli;

/// <summary>A command-line error; the message names the option.</summary>
public sealed class UsageException(string message) : Exception(message);

public enum SerialMode { Stdio, File, None }

/// <summary>What a guest reset (i8042 pulse, ACPI reset register) does.</summary>
public enum RebootAction { Exit, Restart }

/// <summary>Parsed command line of <c>vmm</c> (hand-written: no reflection, so NativeAOT has nothing to trim).</summary>
public sealed class Options
{
    public bool Demo { get; set; }
    public bool Help { get; set; }
    public bool Version { get; set; }
    public string? Kernel { get; set; }
    public string? Initrd { get; set; }
    public string Cmdline { get; set; } = "";
    public ulong Memory { get; set; } = MachineConfig.DefaultMemory;
    public int Cpus { get; set; } = 1;
    public SerialMode Serial { get; set; } = SerialMode.Stdio;
    public string? SerialPath { get; set; }
    public LogLevel LogLevel { get; set; } = LogLevel.Warn;
    public bool Stats { get; set; }

    /// <summary>--seccomp: the per-thread system call filters (on by default).</summary>
    public SeccompMode Seccomp { get; set; } = SeccompMode.On;
    public bool NoIrqchip { get; set; }
    public RebootAction OnReboot { get; set; } = RebootAction.Exit;
    public List<DiskConfig> Disks { get; } = [];
    public List<NetConfig> Nets { get; } = [];
    public List<PassthroughConfig> Devices { get; } = [];
    public List<FsConfig> Fs { get; } = [];
    public bool VirtioConsole { get; set; }
    public bool Rng { get; set; }
    public VsockConfig? Vsock { get; set; }
    /// <summary>--pci-segment mmio64_aperture_weight: the 64-bit PCI window is at least this many × 64 GiB.</summary>
    public int? Mmio64Weight { get; set; }
    /// <summary>--api-socket: <c>path=PATH</c>, <c>fd=N</c> or a bare path (Cloud Hypervisor's forms).</summary>
    public string? ApiSocket { get; set; }
    public string? ConfigFile { get; set; }
    public string? EventMonitor { get; set; }
    /// <summary>--on-reboot was given (otherwise an API-only vmm reboots on a guest reset, as CH does).</summary>
    public bool OnRebootGiven { get; set; }
    /// <summary>Flags that describe the VM itself (they build the VmConfig; --config replaces them all).</summary>
    public List<string> VmFlags { get; } = [];

    /// <summary>The options as parsed, in order: each flag with the value it took (null for one that takes none, such as
    /// --rng). `vmm jail` rewrites the paths in these, so which flags take a value is known in this parser alone.</summary>
    public List<(string Flag, string? Value)> Given { get; } = [];

    /// <summary>`vmm --api-socket PATH` alone: no VM until vm.create / vm.boot.</summary>
    public bool ApiOnly => ApiSocket is not null && !Demo && Kernel is null && ConfigFile is null;

    public const string HelpText = """
        vmm — a KVM virtual machine monitor

        Usage:
          vmm [OPTIONS]               boot the built-in demo guest (same as 'vmm demo'), or with
                                      --kernel, the same as 'vmm run' 
          vmm demo [OPTIONS]          boot the built-in demo guest; exit 0 when it reports success
          vmm run --kernel PATH [OPTIONS]
          vmm run --config FILE.json [OPTIONS]
          vmm --api-socket PATH [OPTIONS]   no VM: wait for vm.create and vm.boot on the API
          vmm remote --api-socket PATH COMMAND [ARGS]
                                      the API client (vmm remote --help)
          vmm jail --id ID --uid UID --gid GID [JAIL OPTIONS] -- run [OPTIONS]
                                      'vmm run' jailed, as Firecracker's jailer (vmm jail --help)
          vmm --help | --version

        Options for 'run' (and, where they apply, 'demo'):
          --kernel PATH        kernel to boot: a Linux bzImage (boot protocol 2.06+, 64-bit entry,
                               e820 map in boot_params); a PVH ELF (Xen PVH note, hvm_start_info); a Multiboot v1 image (ELF32, or a.out-kludge
                               address fields) entered in 32-bit protected mode; or a 64-bit ELF
                               entered in long mode on identity-mapped page tables (multiboot info)
          --initrd PATH        Linux: the initrd; PVH and multiboot: module 0
          --cmdline STR        kernel arguments; a multiboot guest sees "<kernel path> STR", as GRUB and
                               QEMU pass it
          --memory SIZE        guest RAM, e.g. 128M, 2G, 1048576 (default 128M; suffixes K, M, G, T)
          --cpus N             number of vCPUs (default 1; at most what KVM allows)
          --serial MODE        COM1 (0x3f8, IRQ 4): stdio (default: guest output on stdout, stdin to the
                               guest; a terminal is put in raw mode and Ctrl-A x quits, Ctrl-A Ctrl-A
                               sends Ctrl-A), file:PATH (output appended to PATH), none
          --disk path=FILE[,readonly=on][,direct=on][,serial=ID]
                               a virtio-blk disk on a raw image (repeatable); readonly=on rejects writes,
                               direct=on bypasses the host page cache (O_DIRECT); serial is what GET_ID
                               answers (at most 20 bytes)
          --disk vhost_user=on,socket=PATH[,num_queues=N][,queue_size=N]
                               a virtio-blk disk served by a vhost-user back-end (qemu-storage-daemon
                               --export type=vhost-user-blk); the back-end owns the image
          --fs tag=TAG,socket=PATH[,num_queues=N][,queue_size=N]
                               a virtio-fs share served by virtiofsd at PATH (repeatable); the guest
                               mounts it with 'mount -t virtiofs TAG DIR'. See docs/vhost-user.md
          --net tap=NAME[,mac=MAC]
                               a virtio-net interface on tap NAME (created if absent; needs CAP_NET_ADMIN),
                               MAC e.g. 52:54:00:12:34:56 (default: random 52:54:00:xx:xx:xx)
          --console MODE       serial (default) or virtio: a virtio-console port shares the --serial
                               output and takes the console input instead of COM1
          --rng                a virtio-rng device fed from the host CSPRNG
          --vsock cid=N,socket=PATH
                               a virtio-vsock device, guest cid N (3 or more), host end on Unix sockets
                               (Firecracker's hybrid vsock): host clients connect to PATH and send
                               "CONNECT port\n"; guest connects to host port P reach PATH_P. See docs/vsock.md
          --device vfio=/sys/bus/pci/devices/DDDD:BB:DD.F[,p2p=on]
          --device vfio=/sys/bus/mdev/devices/UUID[,p2p=on]
          --device vfio-user=SOCKET[,p2p=on]
                               pass a host PCI device (a GPU: bound to vfio-pci), a mediated device
                               (vGPU) or a vfio-user server's device through to the guest (repeatable);
                               its BARs map straight into the guest, all guest RAM is mapped for its DMA,
                               MSI/MSI-X/INTx go through KVM. p2p=on also maps the BARs of every
                               passed-through device for its DMA (peer to peer; off by default, since
                               mapping GPU BARs of hundreds of GiB slows start-up). See docs/gpu-passthrough.md
          --pci-segment pci_segment=0,mmio64_aperture_weight=N
                               make the 64-bit PCI window at least N x 64 GiB (default N=1): room for the
                               64-bit BARs of devices hot-added later (vm.add-*; see docs/hotplug.md)
          --log-level LEVEL    error, warn (default), info or debug; debug also lists unclaimed I/O
          --stats              print per-vCPU exit counts, costs and vCPU-thread allocations at exit
          --seccomp MODE       system call filters per thread role: on (default: a forbidden call kills
                               vmm with SIGSYS and one line naming the thread and the call), log (allow
                               it; the kernel logs it, audit type 1326) or off; true/false as aliases
          --no-irqchip         no in-kernel PIC/IOAPIC/LAPIC/PIT: HLT then ends the VM (for test guests)
          --on-reboot ACTION   a guest reset (i8042, ACPI reset register): exit (default: vmm exits 0)
                               or restart (a fresh VM boots the same kernel; RAM is not kept)
          --config FILE        the VM as a Cloud Hypervisor VmConfig JSON file (the body of vm.create),
                               instead of --kernel, --disk and the other VM flags
          --api-socket PATH    serve Cloud Hypervisor's REST API on a Unix socket (also path=PATH or
                               fd=N); the socket file is mode 0600, appears once the API answers and is
                               removed on exit. See docs/api.md
          --event-monitor path=FILE|fd=N
                               write lifecycle events as Cloud Hypervisor does (JSON objects)
          -h, --help           this text

        Guest protocol: writing v to I/O port 0xf4 (isa-debug-exit) ends the VM; vmm exits with (v<<1)|1.

        Exit status:
          (v<<1)|1  the guest wrote v to port 0xf4 (always odd)
          0         the guest powered off (ACPI S5) or reset (with --on-reboot exit); 'demo' also
                    when the demo guest succeeded
          2         bad command line or configuration
          4         /dev/kvm is missing, not permitted, or lacks a needed capability
          6         the kernel or initrd cannot be loaded (the message names the bad field)
          8         the guest crashed (triple fault, failed entry, KVM internal error); a report
                    with registers and the disassembled code at RIP goes to stderr
          10        a vCPU halted with nothing to wake it (only with --no-irqchip)
          12        vmm failed (a system call error)
        SIGTERM, SIGINT (when stdin is not a terminal) and SIGHUP stop the VM in order, release
        everything and exit 0, as vm.shutdown followed by vmm.shutdown does.
        """;

    public static Options Parse(string[] args)
    {
        var o = new Options();
        int i = 0;
        bool explicitRun = false;
        if (args.Length == 0)
        {
            o.Demo = true;
            return o;
        }
        switch (args[0])
        {
            case "demo": o.Demo = true; i = 1; break;
            case "run": i = 1; explicitRun = true; break;
            case "-h": case "--help": case "help": o.Help = true; return o;
            case "--version": o.Version = true; return o;
            default:
                if (!args[0].StartsWith('-'))
                    throw new UsageException($"unknown command '{args[0]}' (expected 'run' or 'demo'; see vmm --help)");
                break; // options without a command mean 'run'
        }
        for (; i < args.Length; i++)
        {
            string arg = args[i];
            string? inline = null;
            int eq = arg.IndexOf('=');
            if (arg.StartsWith("--") && eq > 0)
            {
                inline = arg[(eq + 1)..];
                arg = arg[..eq];
            }
            string? taken = null;
            string Value()
            {
                if (inline is null && i + 1 >= args.Length)
                    throw new UsageException($"{arg} needs a value");
                return taken = inline ?? args[++i];
            }
            if (arg is "--kernel" or "--initrd" or "--cmdline" or "--memory" or "--cpus" or "--serial" or "--disk" or "--net"
                or "--device" or "--console" or "--rng" or "--fs" or "--vsock" or "--pci-segment")
                o.VmFlags.Add(arg);
            switch (arg)
            {
                case "-h": case "--help": o.Help = true; break;
                case "--api-socket":
                {
                    string v = Value();
                    if (v.Length == 0 || v is "path=" or "fd=")
                        throw new UsageException("--api-socket needs path=PATH, fd=N or a path");
                    o.ApiSocket = v;
                    break;
                }
                case "--config": o.ConfigFile = Value(); break;
                case "--event-monitor":
                {
                    string v = Value();
                    if (!v.StartsWith("path=", StringComparison.Ordinal) && !v.StartsWith("fd=", StringComparison.Ordinal) || v.Length <= 5 && v.StartsWith("path=", StringComparison.Ordinal) || v == "fd=")
                        throw new UsageException($"--event-monitor must be path=FILE or fd=N, not '{v}'");
                    o.EventMonitor = v;
                    break;
                }
                case "--kernel": o.Kernel = Value(); break;
                case "--initrd": o.Initrd = Value(); break;
                case "--cmdline": o.Cmdline = Value(); break;
                case "--memory": o.Memory = ParseSize(Value(), "--memory"); break;
                case "--cpus":
                {
                    string v = Value();
                    if (!int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out int n) || n < 1)
                        throw new UsageException($"--cpus must be a whole number of at least 1, not '{v}'");
                    o.Cpus = n;
                    break;
                }
                case "--serial":
                {
                    string v = Value();
                    if (v == "stdio") o.Serial = SerialMode.Stdio;
                    else if (v == "none") o.Serial = SerialMode.None;
                    else if (v.StartsWith("file:") && v.Length > 5) { o.Serial = SerialMode.File; o.SerialPath = v[5..]; }
                    else throw new UsageException($"--serial must be stdio, file:PATH or none, not '{v}'");
                    break;
                }
                case "--log-level":
                {
                    string v = Value();
                    if (!Log.TryParse(v, out var level))
                        throw new UsageException($"--log-level must be error, warn, info or debug, not '{v}'");
                    o.LogLevel = level;
                    break;
                }
                case "--disk": o.Disks.Add(ParseDisk(Value())); break;
                case "--net": o.Nets.Add(ParseNet(Value())); break;
                case "--device": o.Devices.Add(ParseDevice(Value())); break;
                case "--fs": o.Fs.Add(ParseFs(Value())); break;
                case "--console":
                {
                    string v = Value();
                    o.VirtioConsole = v switch
                    {
                        "serial" => false,
                        "virtio" => true,
                        _ => throw new UsageException($"--console must be serial or virtio, not '{v}'"),
                    };
                    break;
                }
                case "--rng": o.Rng = true; break;
                case "--vsock":
                    if (o.Vsock is not null)
                        throw new UsageException("--vsock is given twice; a VM has one vsock device");
                    o.Vsock = ParseVsock(Value());
                    break;
                case "--pci-segment": o.Mmio64Weight = ParsePciSegment(Value()); break;
                case "--stats": o.Stats = true; break;
                case "--no-irqchip": o.NoIrqchip = true; break;
                case "--seccomp":
                {
                    string v = Value();
                    o.Seccomp = v switch
                    {
                        "on" or "true" => SeccompMode.On,
                        "log" => SeccompMode.Log,
                        "off" or "false" => SeccompMode.Off,
                        _ => throw new UsageException($"--seccomp must be on, log or off (or true/false), not '{v}'"),
                    };
                    break;
                }
                case "--on-reboot":
                {
                    string v = Value();
                    o.OnRebootGiven = true;
                    o.OnReboot = v switch
                    {
                        "exit" => RebootAction.Exit,
                        "restart" => RebootAction.Restart,
                        _ => throw new UsageException($"--on-reboot must be exit or restart, not '{v}'"),
                    };
                    break;
                }
                default:
                    throw new UsageException($"unknown option '{args[i]}' (see vmm --help)");
            }
            o.Given.Add((arg, taken));
        }
        if (o.ConfigFile is not null && o.VmFlags.Count > 0)
            throw new UsageException($"--config describes the whole VM: {string.Join(", ", o.VmFlags.Distinct())} cannot be given with it");
        if (!o.Help && !o.Demo && o.Kernel is null && o.ConfigFile is null)
        {
            if (explicitRun)
                throw new UsageException("'run' needs --kernel PATH or --config FILE (or run 'vmm' alone for the demo guest)");
            if (o.ApiSocket is null)
                o.Demo = true; // "vmm --stats" and the like: options for the demo guest
            else if (o.VmFlags.Count > 0)
                throw new UsageException($"{string.Join(", ", o.VmFlags.Distinct())} without --kernel: give 'run --kernel PATH', or create the VM through the API");
        }
        if (o.Demo && o.ConfigFile is not null)
            throw new UsageException("'demo' boots the built-in guest: --config belongs to 'run'");
        if (o.Demo && (o.Kernel is not null || o.Initrd is not null))
            throw new UsageException("'demo' boots the built-in guest: --kernel and --initrd belong to 'run'");
        return o;
    }

    /// <summary>"key=value,key=value" of a device option (and of `vmm remote add-*`); unknown or repeated keys are errors
    /// naming <paramref name="option"/>.</summary>
    internal static Dictionary<string, string> ParseKeyValues(string text, string option, string[] keys)
    {
        var result = new Dictionary<string, string>();
        foreach (string part in text.Split(','))
        {
            int eq = part.IndexOf('=');
            if (eq <= 0)
                throw new UsageException($"{option}: '{part}' is not key=value (keys: {string.Join(", ", keys)})");
            string key = part[..eq], value = part[(eq + 1)..];
            if (!keys.Contains(key))
                throw new UsageException($"{option}: unknown key '{key}' (keys: {string.Join(", ", keys)})");
            if (!result.TryAdd(key, value))
                throw new UsageException($"{option}: '{key}' given twice");
        }
        return result;
    }

    /// <summary>An on/off key: on, true, yes or off, false, no; absent is off.</summary>
    internal static bool OnOff(Dictionary<string, string> kv, string key, string option) =>
        !kv.TryGetValue(key, out string? v) ? false : v switch
        {
            "on" or "true" or "yes" => true,
            "off" or "false" or "no" => false,
            _ => throw new UsageException($"{option}: {key} must be on or off, not '{v}'"),
        };

    public static DiskConfig ParseDisk(string text)
    {
        var kv = ParseKeyValues(text, "--disk", ["path", "readonly", "direct", "serial", "vhost_user", "socket", "num_queues", "queue_size"]);
        if (OnOff(kv, "vhost_user", "--disk"))
        {
            // Cloud Hypervisor's form: the back-end owns the image, so the image options do not apply.
            foreach (string key in new[] { "path", "readonly", "direct", "serial" }.Where(kv.ContainsKey))
                throw new UsageException($"--disk: {key} does not go with vhost_user=on (the back-end owns the image)");
            if (!kv.TryGetValue("socket", out string? socket) || socket.Length == 0)
                throw new UsageException("--disk vhost_user=on needs socket=PATH");
            return new DiskConfig("")
            {
                VhostSocket = socket,
                NumQueues = Count(kv, "num_queues", "--disk", 1, 64, 1),
                QueueSize = QueueSize(kv, "--disk", 128),
            };
        }
        foreach (string key in new[] { "socket", "num_queues", "queue_size" }.Where(kv.ContainsKey))
            throw new UsageException($"--disk: {key} needs vhost_user=on");
        if (!kv.TryGetValue("path", out string? path) || path.Length == 0)
            throw new UsageException("--disk needs path=FILE");
        kv.TryGetValue("serial", out string? serial);
        if (serial is not null && (serial.Length > 20 || serial.Any(c => c < 0x20 || c > 0x7E)))
            throw new UsageException($"--disk: serial '{serial}' must be at most 20 printable ASCII characters");
        return new DiskConfig(path, OnOff(kv, "readonly", "--disk"), OnOff(kv, "direct", "--disk"), serial);
    }

    /// <summary>Cloud Hypervisor's --fs: tag=TAG,socket=PATH[,num_queues=N][,queue_size=N][,id=ID].</summary>
    public static FsConfig ParseFs(string text)
    {
        var kv = ParseKeyValues(text, "--fs", ["tag", "socket", "num_queues", "queue_size", "id"]);
        if (!kv.TryGetValue("tag", out string? tag) || tag.Length == 0)
            throw new UsageException("--fs needs tag=TAG");
        if (System.Text.Encoding.UTF8.GetByteCount(tag) > 36)
            throw new UsageException($"--fs: tag '{tag}' is longer than 36 bytes");
        if (!kv.TryGetValue("socket", out string? socket) || socket.Length == 0)
            throw new UsageException("--fs needs socket=PATH (virtiofsd's --socket-path)");
        kv.TryGetValue("id", out string? id);
        return new FsConfig(tag, socket, Count(kv, "num_queues", "--fs", 1, 63, 1), QueueSize(kv, "--fs", 1024), id);
    }

    private static int Count(Dictionary<string, string> kv, string key, string option, int min, int max, int fallback)
    {
        if (!kv.TryGetValue(key, out string? v))
            return fallback;
        if (!int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out int n) || n < min || n > max)
            throw new UsageException($"{option}: {key} must be a number from {min} to {max}, not '{v}'");
        return n;
    }

    private static ushort QueueSize(Dictionary<string, string> kv, string option, int fallback)
    {
        int n = Count(kv, "queue_size", option, 1, 32768, fallback);
        if ((n & (n - 1)) != 0)
            throw new UsageException($"{option}: queue_size must be a power of two, not {n}");
        return (ushort)n;
    }

    public static PassthroughConfig ParseDevice(string text)
    {
        var kv = ParseKeyValues(text, "--device", ["vfio", "vfio-user", "p2p"]);
        bool p2p = OnOff(kv, "p2p", "--device");
        bool kernel = kv.TryGetValue("vfio", out string? path), user = kv.TryGetValue("vfio-user", out string? socket);
        if (kernel == user)
            throw new UsageException("--device needs exactly one of vfio=/sys/bus/pci/devices/DDDD:BB:DD.F, vfio=/sys/bus/mdev/devices/UUID or vfio-user=SOCKET");
        string target = (kernel ? path : socket)!;
        if (target.Length == 0)
            throw new UsageException($"--device: {(kernel ? "vfio" : "vfio-user")}= needs a path");
        return new PassthroughConfig(kernel ? PassthroughKind.Vfio : PassthroughKind.VfioUser, target, p2p);
    }

    /// <summary>CH's --pci-segment for the one segment: pci_segment=0 and mmio64_aperture_weight=N (1-1024).</summary>
    public static int ParsePciSegment(string text)
    {
        var kv = ParseKeyValues(text, "--pci-segment", ["pci_segment", "mmio64_aperture_weight"]);
        if (!kv.TryGetValue("pci_segment", out string? segment) || segment != "0")
            throw new UsageException("--pci-segment needs pci_segment=0 (vmm has one PCI segment)");
        if (!kv.TryGetValue("mmio64_aperture_weight", out string? w) || !int.TryParse(w, NumberStyles.None, CultureInfo.InvariantCulture, out int weight)
            || weight is < 1 or > 1024)
            throw new UsageException("--pci-segment needs mmio64_aperture_weight=N, N from 1 to 1024 (the 64-bit PCI window in units of 64 GiB)");
        return weight;
    }

    public static NetConfig ParseNet(string text)
    {
        var kv = ParseKeyValues(text, "--net", ["tap", "mac"]);
        if (!kv.TryGetValue("tap", out string? tap) || tap.Length == 0)
            throw new UsageException("--net needs tap=NAME");
        if (tap.Length > 15 || tap.Any(c => c is '/' or ' ' or ':' || char.IsControl(c)))
            throw new UsageException($"--net: '{tap}' is not a valid interface name (at most 15 characters, no '/', ':' or spaces)");
        byte[]? mac = null;
        if (kv.TryGetValue("mac", out string? m))
        {
            string[] parts = m.Split(':');
            mac = new byte[6];
            if (parts.Length != 6 || !parts.Select((p, i) => p.Length == 2 && byte.TryParse(p, NumberStyles.HexNumber, CultureInfo.InvariantCulture, out mac[i])).All(ok => ok))
                throw new UsageException($"--net: mac '{m}' is not six hex bytes such as 52:54:00:12:34:56");
            if ((mac[0] & 1) != 0)
                throw new UsageException($"--net: mac '{m}' is a multicast address");
        }
        return new NetConfig(tap, mac);
    }

    public static VsockConfig ParseVsock(string text)
    {
        var kv = ParseKeyValues(text, "--vsock", ["cid", "socket", "id"]);
        if (!kv.TryGetValue("cid", out string? c) || !kv.TryGetValue("socket", out string? socket) || socket.Length == 0)
            throw new UsageException("--vsock needs cid=N,socket=PATH");
        if (!ulong.TryParse(c, NumberStyles.None, CultureInfo.InvariantCulture, out ulong cid) || cid < VsockConfig.MinCid || cid > VsockConfig.MaxCid)
            throw new UsageException($"--vsock: cid '{c}' must be a number from {VsockConfig.MinCid} to {VsockConfig.MaxCid} (0-2 are reserved)");
        kv.TryGetValue("id", out string? id);
        return new VsockConfig(cid, socket, id);
    }

    /// <summary>"128M", "2G", "512K", "1T", "4096" (bytes); "MiB"/"MB" spellings too (all binary units).</summary>
    public static ulong ParseSize(string text, string option)
    {
        string t = text.Trim();
        ulong multiplier = 1;
        string upper = t.ToUpperInvariant();
        foreach (var (suffix, mult) in new[] { ("KIB", 1UL << 10), ("MIB", 1UL << 20), ("GIB", 1UL << 30), ("TIB", 1UL << 40),
                                                ("KB", 1UL << 10), ("MB", 1UL << 20), ("GB", 1UL << 30), ("TB", 1UL << 40),
                                                ("K", 1UL << 10), ("M", 1UL << 20), ("G", 1UL << 30), ("T", 1UL << 40) })
        {
            if (upper.EndsWith(suffix, StringComparison.Ordinal))
            {
                multiplier = mult;
                t = t[..^suffix.Length];
                break;
            }
        }
        if (!ulong.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out ulong n) || n == 0)
            throw new UsageException($"{option} must be a size such as 128M or 2G, not '{text}'");
        try
        {
            return checked(n * multiplier);
        }
        catch (OverflowException)
        {
            throw new UsageException($"{option} {text} is too large");
        }
    }
}
