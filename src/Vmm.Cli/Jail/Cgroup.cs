namespace Vmm.Cli.Jail;

/// <summary>The VM's cgroup v2: &lt;cgroup2 mount&gt;/&lt;parent&gt;/&lt;id&gt;, found through /proc/self/mountinfo as
/// Firecracker's jailer finds its hierarchy. The parent makes it and writes the --cgroup values; the child moves
/// itself in (cgroup.procs) before it drops its privileges, so the jailed vmm and every thread it starts are in it.</summary>
public static class Cgroup
{
    /// <summary>The first cgroup2 mount point, or null.</summary>
    public static string? Hierarchy(IEnumerable<string> mountinfo)
    {
        foreach (string line in mountinfo)
        {
            var parts = line.Split(' ');
            int dash = Array.IndexOf(parts, "-");
            if (dash > 4 && dash + 1 < parts.Length && parts[dash + 1] == "cgroup2")
                return Unescape(parts[4]);
        }
        return null;
    }

    /// <summary>mountinfo escapes space, tab, newline and backslash as \ooo.</summary>
    private static string Unescape(string s) => System.Text.RegularExpressions.Regex.Replace(s, @"\\([0-7]{3})", m => ((char)Convert.ToInt32(m.Groups[1].Value, 8)).ToString());

    /// <summary>The controllers --cgroup files need: "cpu" for cpu.max, "memory" for memory.max.</summary>
    public static IReadOnlyList<string> Controllers(JailOptions o) =>
        o.Cgroups.Select(c => c.Key[..c.Key.IndexOf('.')]).Distinct(StringComparer.Ordinal).ToList();

    public static string? PathFor(JailOptions o) =>
        Hierarchy(File.ReadLines("/proc/self/mountinfo")) is { } root ? Path.Combine(root, o.ParentCgroup, o.Id) : null;

    /// <summary>Makes the VM's cgroup with its limits; null when there is no cgroup v2 hierarchy, or none was asked for
    /// and the hierarchy refuses a new cgroup (a warning then: the VM runs in the caller's cgroup).</summary>
    public static string? Create(JailOptions o)
    {
        try
        {
            return CreateOrThrow(o);
        }
        catch (Exception e) when (o.Cgroups.Count == 0 && e is JailException or IOException or UnauthorizedAccessException)
        {
            Console.Error.WriteLine($"vmm: warning: jail: no cgroup of its own for the VM: {e.Message}");
            return null;
        }
    }

    private static string? CreateOrThrow(JailOptions o)
    {
        string? root = Hierarchy(File.ReadLines("/proc/self/mountinfo"));
        if (root is null)
        {
            if (o.Cgroups.Count > 0)
                throw new JailException("--cgroup needs a cgroup v2 hierarchy and none is mounted (mount -t cgroup2 none /sys/fs/cgroup)");
            return null;
        }
        var controllers = Controllers(o);
        string available = File.ReadAllText(Path.Combine(root, "cgroup.controllers")).Trim();
        foreach (string c in controllers)
        {
            if (!available.Split(' ').Contains(c))
                throw new JailException($"--cgroup {o.Cgroups.First(k => k.Key.StartsWith(c + ".", StringComparison.Ordinal)).Key}: the {c} controller is not available in the cgroup v2 hierarchy at {root} (it offers: {(available.Length == 0 ? "none" : available)})");
        }
        // Each level above the VM's cgroup hands the controllers down (cgroup v2's subtree_control); the VM's own
        // cgroup holds the process, so it enables none (no internal processes).
        string dir = root;
        foreach (string part in o.ParentCgroup.Split('/').Append(o.Id))
        {
            if (controllers.Count > 0)
                Write(Path.Combine(dir, "cgroup.subtree_control"), string.Join(' ', controllers.Select(c => "+" + c)), "cgroup.subtree_control");
            dir = Path.Combine(dir, part);
            try
            {
                Directory.CreateDirectory(dir);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new JailException($"cannot make the VM's cgroup {dir}: {e.Message}");
            }
        }
        foreach (var (file, value) in o.Cgroups)
        {
            string path = Path.Combine(dir, file);
            if (!File.Exists(path))
                throw new UsageException($"jail: --cgroup {file}: no such file in the VM's cgroup {dir}");
            try
            {
                File.WriteAllText(path, value);
            }
            catch (IOException e)
            {
                throw new UsageException($"jail: --cgroup {file}={value}: the kernel refused it ({e.Message})");
            }
        }
        return dir;
    }

    private static void Write(string path, string value, string what)
    {
        try
        {
            File.WriteAllText(path, value);
        }
        catch (IOException e)
        {
            throw new JailException($"cannot write '{value}' to {path} ({what}): {e.Message}");
        }
    }

    /// <summary>Moves the calling process into the VM's cgroup, when there is one.</summary>
    public static void Join(JailOptions o)
    {
        string? dir = PathFor(o);
        if (dir is not null && Directory.Exists(dir))
            Write(Path.Combine(dir, "cgroup.procs"), "0", "joining the VM's cgroup");
    }
}
