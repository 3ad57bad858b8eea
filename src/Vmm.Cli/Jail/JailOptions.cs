using System.Globalization;
using System.Text.RegularExpressions;

namespace Vmm.Cli.Jail;

/// <summary>`vmm jail [JAIL OPTIONS] -- run [VM OPTIONS]`: the jail's own options, named after Firecracker's jailer
/// (docs/jailer.md) where it has one: --id, --exec-file, --uid, --gid, --chroot-base-dir, --netns, --parent-cgroup,
/// --cgroup, --resource-limit; --new-netns is vmm's (a fresh, empty network namespace).</summary>
public sealed partial class JailOptions
{
    public const string DefaultChrootBase = "/srv/jailer";
    public const string DefaultParentCgroup = "vmm";
    /// <summary>Firecracker's jailer bounds no-file to 2048 unless told otherwise; so does vmm.</summary>
    public const ulong DefaultNoFile = 2048;

    public required string Id { get; init; }
    public required uint Uid { get; init; }
    public required uint Gid { get; init; }
    /// <summary>The vmm executable to run in the jail; null: this one (/proc/self/exe).</summary>
    public string? ExecFile { get; init; }
    public string ChrootBase { get; init; } = DefaultChrootBase;
    public string? NetNs { get; init; }
    public bool NewNetNs { get; init; }
    public string ParentCgroup { get; init; } = DefaultParentCgroup;
    /// <summary>--cgroup FILE=VALUE in the order given (e.g. cpu.max=50000 100000, memory.max=512M, pids.max=64).</summary>
    public IReadOnlyList<KeyValuePair<string, string>> Cgroups { get; init; } = [];
    /// <summary>--resource-limit fsize=N / no-file=N (Firecracker's names).</summary>
    public IReadOnlyDictionary<string, ulong> ResourceLimits { get; init; } = new Dictionary<string, ulong>();
    /// <summary>Everything after "--", starting with "run".</summary>
    public required string[] VmArgs { get; init; }

    /// <summary>&lt;chroot-base&gt;/vmm/&lt;id&gt;: the jail's directory on the host (its root is below it).</summary>
    public string JailDir => Path.Combine(Path.GetFullPath(ChrootBase), "vmm", Id);

    /// <summary>&lt;chroot-base&gt;/vmm/&lt;id&gt;/root: the directory that becomes / for the jailed vmm.</summary>
    public string RootDir => Path.Combine(JailDir, "root");

    public const string HelpText = """
        vmm jail — run 'vmm run' jailed, as Firecracker's jailer runs firecracker

        Usage:
          vmm jail --id ID --uid UID --gid GID [JAIL OPTIONS] -- run [VM OPTIONS]

        Jail options:
          --id ID                 the VM's name: letters, digits and '-', at most 64 (required)
          --uid UID, --gid GID    the user and group the jailed vmm runs as (required; numbers)
          --exec-file PATH        the vmm executable to jail (default: this one); it is copied into the jail
          --chroot-base-dir DIR   where jails are built (default /srv/jailer): the jail root is DIR/vmm/ID/root
          --netns PATH            join this network namespace (e.g. /var/run/netns/NAME) ...
          --new-netns             ... or start in a new, empty one (default: the caller's)
          --parent-cgroup PATH    the VM's cgroup is CGROUP2-ROOT/PATH/ID (default: vmm)
          --cgroup FILE=VALUE     write VALUE to the VM's cgroup v2 FILE, e.g. cpu.max='50000 100000',
                                  memory.max=1G, pids.max=64 (repeatable)
          --resource-limit RES=N  fsize=BYTES or no-file=N (default no-file=2048) (repeatable)

        The VM options are those of 'vmm run'; the files they name (kernel, initrd, disks, sockets, serial and
        event files) are bind-mounted into the jail and the options rewritten to the paths inside it. Exit
        status: vmm's own, or 2 for a bad jail option or a file the jail user may not use, 12 when the jail
        cannot be built (the line names the system call and path).
        """;

    [GeneratedRegex("^[A-Za-z0-9-]{1,64}$")]
    private static partial Regex IdPattern();

    [GeneratedRegex(@"^[a-z][a-z0-9_]*\.[a-z0-9_.]+$")]
    private static partial Regex CgroupFilePattern();

    [GeneratedRegex(@"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")]
    private static partial Regex CgroupPathPattern();

    /// <summary>Parses the arguments after "jail". Every problem is one <see cref="UsageException"/> line.</summary>
    public static JailOptions Parse(string[] args)
    {
        string? id = null, uid = null, gid = null, execFile = null, chrootBase = null, netns = null, parent = null;
        bool newNetNs = false;
        var cgroups = new List<KeyValuePair<string, string>>();
        var limits = new Dictionary<string, ulong>();
        int i = 0;
        for (; i < args.Length && args[i] != "--"; i++)
        {
            string arg = args[i];
            string? inline = null;
            int eq = arg.IndexOf('=');
            if (arg.StartsWith("--", StringComparison.Ordinal) && eq > 0)
            {
                inline = arg[(eq + 1)..];
                arg = arg[..eq];
            }
            string Value()
            {
                if (inline is not null)
                    return inline;
                if (i + 1 >= args.Length || args[i + 1] == "--")
                    throw new UsageException($"jail: {arg} needs a value");
                return args[++i];
            }
            void Once(string? current)
            {
                if (current is not null)
                    throw new UsageException($"jail: {arg} is given twice");
            }
            switch (arg)
            {
                case "--id": Once(id); id = Value(); break;
                case "--uid": Once(uid); uid = Value(); break;
                case "--gid": Once(gid); gid = Value(); break;
                case "--exec-file": Once(execFile); execFile = Value(); break;
                case "--chroot-base-dir": Once(chrootBase); chrootBase = Value(); break;
                case "--netns": Once(netns); netns = Value(); break;
                case "--new-netns": newNetNs = true; break;
                case "--parent-cgroup": Once(parent); parent = Value(); break;
                case "--cgroup":
                {
                    string v = Value();
                    int e = v.IndexOf('=');
                    string file = e > 0 ? v[..e] : v, value = e > 0 ? v[(e + 1)..] : "";
                    if (e <= 0 || !CgroupFilePattern().IsMatch(file))
                        throw new UsageException($"jail: --cgroup must be FILE=VALUE with a cgroup v2 file such as cpu.max, memory.max or pids.max, not '{v}'");
                    if (value.Length == 0 || value.Any(char.IsControl))
                        throw new UsageException($"jail: --cgroup {file} needs a value on one line");
                    if (file.StartsWith("cgroup.", StringComparison.Ordinal))
                        throw new UsageException($"jail: --cgroup {file}: the cgroup.* files are the jailer's to write");
                    cgroups.Add(new(file, value));
                    break;
                }
                case "--resource-limit":
                {
                    string v = Value();
                    int e = v.IndexOf('=');
                    string res = e > 0 ? v[..e] : v;
                    if (res is not ("fsize" or "no-file"))
                        throw new UsageException($"jail: --resource-limit must be fsize=BYTES or no-file=N, not '{v}'");
                    if (!ulong.TryParse(v.AsSpan(e + 1), NumberStyles.None, CultureInfo.InvariantCulture, out ulong n) || (res == "no-file" && n == 0))
                        throw new UsageException($"jail: --resource-limit {res} needs a whole number{(res == "no-file" ? " of at least 1" : "")}, not '{v[(e + 1)..]}'");
                    limits[res] = n;
                    break;
                }
                case "-h": case "--help":
                    throw new UsageException("jail: --help goes alone: vmm jail --help");
                default:
                    throw new UsageException($"jail: unknown option '{args[i]}' (see vmm jail --help)");
            }
        }
        if (i >= args.Length)
            throw new UsageException("jail: the VM's options follow '--': vmm jail --id ID --uid UID --gid GID -- run --kernel PATH ...");
        string[] vmArgs = args[(i + 1)..];
        if (id is null)
            throw new UsageException("jail: --id ID is required (letters, digits and '-', at most 64)");
        if (!IdPattern().IsMatch(id))
            throw new UsageException($"jail: --id '{id}' must be 1 to 64 letters, digits or '-'");
        if (uid is null || gid is null)
            throw new UsageException("jail: --uid and --gid are required: the jailed vmm runs as that user and group");
        uint Number(string text, string option) =>
            uint.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out uint n) && n != uint.MaxValue ? n
                : throw new UsageException($"jail: {option} must be a number (a {(option == "--uid" ? "user" : "group")} id), not '{text}'");
        uint u = Number(uid, "--uid"), g = Number(gid, "--gid");
        if (netns is not null && newNetNs)
            throw new UsageException("jail: --netns joins a network namespace and --new-netns makes one: give one of them");
        if (netns is not null && netns.Length == 0 || execFile is not null && execFile.Length == 0 || chrootBase is not null && chrootBase.Length == 0)
            throw new UsageException("jail: an empty path was given");
        if (parent is not null && (!CgroupPathPattern().IsMatch(parent) || parent.Split('/').Any(p => p is "." or "..")))
            throw new UsageException($"jail: --parent-cgroup '{parent}' must be a relative path of names (no '.', '..' or empty parts)");
        if (chrootBase is not null && chrootBase.Any(char.IsControl))
            throw new UsageException("jail: --chroot-base-dir has control characters");
        if (vmArgs.Length == 0 || vmArgs[0] != "run")
            throw new UsageException("jail: the VM's options after '--' start with 'run' (vmm jail ... -- run --kernel PATH ...)");
        return new JailOptions
        {
            Id = id,
            Uid = u,
            Gid = g,
            ExecFile = execFile,
            ChrootBase = chrootBase ?? DefaultChrootBase,
            NetNs = netns,
            NewNetNs = newNetNs,
            ParentCgroup = parent ?? DefaultParentCgroup,
            Cgroups = cgroups,
            ResourceLimits = limits,
            VmArgs = vmArgs,
        };
    }
}
