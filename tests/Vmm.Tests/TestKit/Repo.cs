using System.Diagnostics;

namespace Vmm.Tests.TestKit;

/// <summary>Paths in the repository and a helper to run build tools from tests.</summary>
public static class Repo
{
    public static string Root { get; } = FindRoot();

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "Vmm.sln")))
                return dir.FullName;
        }
        throw new InvalidOperationException("cannot find the repository root (Vmm.sln) above " + AppContext.BaseDirectory);
    }

    public static string PathTo(params string[] parts) => Path.Combine([Root, .. parts]);

    public sealed record Result(int ExitCode, string Stdout, string Stderr);

    /// <summary>Runs a program to completion, capturing its output; throws with both streams on timeout.</summary>
    public static Result Run(string fileName, IEnumerable<string> args, string? workingDirectory = null, TimeSpan? timeout = null,
        string? stdin = null, IDictionary<string, string>? environment = null)
    {
        var psi = new ProcessStartInfo(fileName)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            WorkingDirectory = workingDirectory ?? Root,
            UseShellExecute = false,
        };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        if (environment is not null)
            foreach (var (k, v) in environment)
                psi.Environment[k] = v;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (stdin is not null)
            p.StandardInput.Write(stdin);
        p.StandardInput.Close();
        if (!p.WaitForExit(timeout ?? TimeSpan.FromMinutes(10)))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{fileName} {string.Join(' ', args)} did not finish in {timeout}: {stdout.Result}\n{stderr.Result}");
        }
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Runs a build step and fails the test run with its output if it fails.</summary>
    public static void MustRun(string fileName, params string[] args)
    {
        var r = Run(fileName, args, timeout: TimeSpan.FromMinutes(10));
        if (r.ExitCode != 0)
            throw new InvalidOperationException($"'{fileName} {string.Join(' ', args)}' failed with {r.ExitCode}:\n{r.Stdout}\n{r.Stderr}");
    }
}
