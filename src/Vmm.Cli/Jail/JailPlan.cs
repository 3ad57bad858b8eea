namespace Vmm.Cli.Jail;

/// <summary>What the jailed vmm may do with a path inside the jail; the landlock rule and the permission check of the
/// jail user follow from it.</summary>
[Flags]
public enum JailRights
{
    Read = 1,
    Write = 2,
    Execute = 4,
    /// <summary>Create (and remove) Unix sockets in a directory: the API socket, the vsock listener.</summary>
    MakeSocket = 8,
}

/// <summary>A host file or directory bind-mounted into the jail.</summary>
public sealed record JailBind(string HostPath, string JailPath, bool IsDirectory, bool ReadOnly, JailRights Rights, string Option);

/// <summary>A character device node made in the jail's /dev with the host node's numbers. Owned by the jail user
/// (mode 0600) unless <see cref="Shared"/> (/dev/null, /dev/urandom: root, 0666).</summary>
public sealed record JailDevice(string JailPath, string HostPath, bool Shared);

/// <summary>Everything the jail holds and the `vmm run` command line that uses it, computed from the options alone
/// (and the host paths they name), so the parent and the child that builds the jail compute the same plan.</summary>
public sealed class JailPlan
{
    /// <summary>The executable's path inside the jail.</summary>
    public const string ExecPath = "/vmm";
    /// <summary>Kernel, initrd, disk images, socket files: /vm/NAME (NAME-2, NAME-3… when two share a name).</summary>
    public const string FilesDir = "/vm";
    /// <summary>Directories where vmm makes sockets (API, vsock): /run/vmm/sockN.</summary>
    public const string SocketDirs = "/run/vmm";

    private readonly Dictionary<string, JailBind> _byHost = new(StringComparer.Ordinal);
    private readonly HashSet<string> _jailNames = new(StringComparer.Ordinal);
    private int _socketDirs;

    public List<JailBind> Binds { get; } = [];
    public List<JailDevice> Devices { get; } = [];
    /// <summary>The `run …` arguments with every path rewritten to its place in the jail.</summary>
    public List<string> RunArgs { get; } = [];
    /// <summary>RLIMIT_MEMLOCK the jailed vmm needs: with kernel VFIO devices guest RAM is pinned for their DMA, so
    /// the guest RAM size; else null (left as it is).</summary>
    public ulong? MemlockBytes { get; private set; }

    /// <summary>Builds the plan for <paramref name="vmArgs"/> ("run" first). <paramref name="cwd"/> resolves relative
    /// paths; <paramref name="libraries"/> are the shared objects the executable needs (bound read-only at the same
    /// paths); <paramref name="exists"/> tells which host device nodes exist.</summary>
    public static JailPlan Build(string[] vmArgs, string cwd, IEnumerable<string> libraries, Func<string, bool> exists)
    {
        var vm = Options.Parse(vmArgs); // the same errors as 'vmm run' gives
        var plan = new JailPlan();
        if (vm.ConfigFile is not null)
            throw new UsageException("jail: --config is not supported in the jail yet: give the VM as flags (--kernel, --disk, ...)");
        foreach (string lib in libraries)
            plan.Add(lib, lib, isDirectory: false, readOnly: true, JailRights.Read | JailRights.Execute, "library");

        plan.Devices.Add(new("/dev/null", "/dev/null", Shared: true));
        plan.Devices.Add(new("/dev/urandom", "/dev/urandom", Shared: true));
        if (exists("/dev/kvm")) // without it vmm says so itself, inside the jail (status 4)
            plan.Devices.Add(new("/dev/kvm", "/dev/kvm", Shared: false));
        if (vm.Nets.Count > 0)
            plan.Devices.Add(new("/dev/net/tun", "/dev/net/tun", Shared: false));

        string Full(string p) => Path.GetFullPath(p, cwd);
        plan.RunArgs.Add("run");
        foreach (var (arg, taken) in vm.Given)
        {
            if (taken is not string value)
            {
                plan.RunArgs.Add(arg); // a flag that takes no value (--rng, --stats, ...)
                continue;
            }
            string rewritten = arg switch
            {
                "--kernel" or "--initrd" => plan.File(Full(value), readOnly: true, arg),
                "--disk" => plan.KeyValues(value, (k, v) => k switch
                {
                    "path" => plan.File(Full(v), readOnly: Options.ParseDisk(value).ReadOnly, arg),
                    "socket" => plan.File(Full(v), readOnly: false, arg),
                    _ => v,
                }),
                "--fs" => plan.KeyValues(value, (k, v) => k == "socket" ? plan.File(Full(v), readOnly: false, arg) : v),
                "--vsock" => plan.KeyValues(value, (k, v) => k == "socket" ? plan.SocketIn(Full(v), arg) : v),
                "--device" => plan.KeyValues(value, (k, v) => k switch
                {
                    "vfio-user" => plan.File(Full(v), readOnly: false, arg),
                    "vfio" => plan.Vfio(v, vm.Memory, exists),
                    _ => v,
                }),
                "--serial" when value.StartsWith("file:", StringComparison.Ordinal) => "file:" + plan.File(Full(value[5..]), readOnly: false, arg, create: true),
                "--api-socket" when value.StartsWith("path=", StringComparison.Ordinal) => "path=" + plan.SocketIn(Full(value[5..]), arg),
                "--api-socket" when !value.StartsWith("fd=", StringComparison.Ordinal) => plan.SocketIn(Full(value), arg),
                "--event-monitor" when value.StartsWith("path=", StringComparison.Ordinal) => "path=" + plan.File(Full(value[5..]), readOnly: false, arg, create: true),
                "--api-socket" or "--event-monitor" when value.StartsWith("fd=", StringComparison.Ordinal) => plan.Fd(value),
                _ => value,
            };
            plan.RunArgs.Add(arg + "=" + rewritten);
        }
        return plan;
    }

    /// <summary>Rewrites the values of a key=value,… option (<paramref name="map"/> gets the key and the value).</summary>
    private string KeyValues(string text, Func<string, string, string> map)
    {
        return string.Join(',', text.Split(',').Select(p =>
        {
            int eq = p.IndexOf('=');
            return eq <= 0 ? p : p[..(eq + 1)] + map(p[..eq], p[(eq + 1)..]);
        }));
    }

    /// <summary>A host file at /vm/NAME in the jail.</summary>
    private string File(string host, bool readOnly, string option, bool create = false)
    {
        var rights = JailRights.Read | (readOnly ? 0 : JailRights.Write);
        var b = Add(host, null, isDirectory: false, readOnly, rights, option);
        if (create && !CreateIfMissing.Contains(host))
            CreateIfMissing.Add(host);
        return b.JailPath;
    }

    /// <summary>Descriptors the VM options name (--api-socket fd=N, --event-monitor fd=N): kept open across execve.</summary>
    public List<int> InheritedFds { get; } = [];

    private string Fd(string value)
    {
        if (int.TryParse(value.AsSpan(3), out int fd) && fd >= 0)
            InheritedFds.Add(fd);
        return value;
    }

    /// <summary>Files vmm creates (serial and event files): the jailer creates them, owned by the jail user.</summary>
    public List<string> CreateIfMissing { get; } = [];

    /// <summary>A socket vmm makes: its host directory is bound at /run/vmm/sockN, so the socket appears where the
    /// caller asked for it (and sockets the host makes there, such as vsock's PATH_PORT, are seen in the jail).</summary>
    private string SocketIn(string host, string option)
    {
        string dir = Path.GetDirectoryName(host) ?? "/";
        if (!_byHost.TryGetValue(dir, out var b))
            b = Add(dir, $"{SocketDirs}/sock{++_socketDirs}", isDirectory: true, readOnly: false, JailRights.Read | JailRights.MakeSocket, option);
        return b.JailPath + "/" + Path.GetFileName(host);
    }

    /// <summary>A kernel VFIO device: its sysfs path stays (sysfs is bound read-only) and every VFIO node comes along;
    /// <paramref name="guestMemory"/> bytes will be pinned.</summary>
    private string Vfio(string sysfsPath, ulong guestMemory, Func<string, bool> exists)
    {
        if (MemlockBytes is null) // the first kernel VFIO device
        {
            MemlockBytes = guestMemory;
            Add("/sys", "/sys", isDirectory: true, readOnly: true, JailRights.Read, "--device vfio");
            foreach (string node in VfioNodes(exists))
                Devices.Add(new(node, node, Shared: false));
        }
        return sysfsPath;
    }

    /// <summary>/dev/vfio/vfio, the group nodes, the iommufd cdevs (/dev/vfio/devices/vfioN) and /dev/iommu.</summary>
    private static IEnumerable<string> VfioNodes(Func<string, bool> exists)
    {
        var nodes = new List<string>();
        if (Directory.Exists("/dev/vfio"))
            nodes.AddRange(Directory.EnumerateFileSystemEntries("/dev/vfio", "*", SearchOption.AllDirectories).Where(p => !Directory.Exists(p)).Order(StringComparer.Ordinal));
        if (exists("/dev/iommu"))
            nodes.Add("/dev/iommu");
        return nodes;
    }

    private JailBind Add(string host, string? jailPath, bool isDirectory, bool readOnly, JailRights rights, string option)
    {
        if (_byHost.TryGetValue(host, out var existing))
        {
            // The same file twice (a disk given read-only twice, or read-only and writable): one bind, the wider rights.
            if (existing.ReadOnly && !readOnly || (existing.Rights | rights) != existing.Rights)
            {
                var merged = existing with { ReadOnly = existing.ReadOnly && readOnly, Rights = existing.Rights | rights };
                Binds[Binds.IndexOf(existing)] = merged;
                _byHost[host] = merged;
                return merged;
            }
            return existing;
        }
        if (host.Any(c => c is '\n' or '\t'))
            throw new UsageException($"jail: {option}: a path with a newline or tab cannot be jailed");
        jailPath ??= UniqueName(Path.GetFileName(host));
        var b = new JailBind(host, jailPath, isDirectory, readOnly, rights, option);
        _byHost[host] = b;
        Binds.Add(b);
        return b;
    }

    private string UniqueName(string name)
    {
        if (name.Length == 0)
            name = "file";
        string stem = Path.GetFileNameWithoutExtension(name), ext = Path.GetExtension(name);
        string candidate = name;
        for (int n = 2; !_jailNames.Add(candidate); n++)
            candidate = $"{stem}-{n}{ext}";
        return $"{FilesDir}/{candidate}";
    }
}
