using System.Runtime.InteropServices;
using Vmm.Boot;
using Vmm.Interop;
using Vmm.Kvm;
using Vmm.Machine;

namespace Vmm.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        Options options;
        try
        {
            options = Options.Parse(args);
        }
        catch (UsageException e)
        {
            Console.Error.WriteLine($"vmm: error: {e.Message}");
            return ExitStatus.Usage;
        }
        if (options.Help)
        {
            Console.Out.WriteLine(Options.HelpText);
            return ExitStatus.Success;
        }
        if (options.Version)
        {
            Console.Out.WriteLine("vmm " + (typeof(Program).Assembly.GetName().Version?.ToString(3) ?? "0.0.0"));
            return ExitStatus.Success;
        }
        return Run(options);
    }

    private static int Run(Options options)
    {
        var log = new Log(options.LogLevel);
        Stream? serialOut = null;
        RawTerminal? terminal = null;
        PosixSignalRegistration? onTerm = null, onHup = null;
        try
        {
            BootFile kernel;
            BootFile? module = null;
            if (options.Demo)
            {
                kernel = DemoGuest.Build();
            }
            else
            {
                kernel = ReadBootFile(options.Kernel!, "--kernel");
                if (options.Initrd is not null)
                    module = ReadBootFile(options.Initrd, "--initrd");
            }
            Stream? serialIn = null;
            switch (options.Serial)
            {
                case SerialMode.Stdio:
                    serialOut = Console.OpenStandardOutput();
                    serialIn = Console.IsInputRedirected && IsNullDevice() ? null : Console.OpenStandardInput();
                    if (!Console.IsInputRedirected)
                    {
                        // An interactive terminal: raw mode so every key (Ctrl-C too) reaches the guest; Ctrl-A x quits.
                        terminal = RawTerminal.TryEnter(0);
                        if (terminal is not null)
                        {
                            var t = terminal;
                            onTerm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, _ => t.Dispose());
                            onHup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, _ => t.Dispose());
                            log.Info("console: raw terminal; press Ctrl-A x to quit");
                        }
                    }
                    break;
                case SerialMode.File:
                    try
                    {
                        serialOut = new FileStream(options.SerialPath!, FileMode.Append, FileAccess.Write, FileShare.Read);
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                    {
                        throw new UsageException($"--serial file:{options.SerialPath}: {e.Message}");
                    }
                    break;
            }
            var config = new MachineConfig
            {
                Kernel = kernel,
                Module = module,
                Arguments = options.Cmdline,
                MemoryBytes = options.Memory,
                Cpus = options.Cpus,
                SerialOutput = serialOut,
                SerialInput = serialIn,
                InKernelIrqchip = !options.NoIrqchip,
                Disks = options.Disks,
                Nets = options.Nets,
                Devices = options.Devices,
                VirtioConsole = options.VirtioConsole,
                VirtioRng = options.Rng,
                ConsoleEscape = terminal is not null,
            };

            for (int boot = 1; ; boot++)
            {
                VmOutcome outcome;
                string stats;
                using (var vm = new VirtualMachine(config, log))
                {
                    outcome = vm.Run();
                    vm.Dispose(); // flushes the console before we report
                    stats = vm.DescribeStats();
                }
                if (options.Stats || log.IsEnabled(LogLevel.Debug))
                    Console.Error.WriteLine(string.Join('\n', stats.Split('\n').Select(l => "vmm: stats: " + l)));
                if (!ShouldRestart(outcome, options))
                    return Report(outcome, options, log);
                // A fresh machine, as after a cold reset: RAM is not kept, the kernel is loaded again.
                log.Info($"{outcome.Message}: restarting the VM (--on-reboot restart, boot {boot + 1})");
            }
        }
        catch (UsageException e)
        {
            log.Error(e.Message);
            return ExitStatus.Usage;
        }
        catch (ConfigException e)
        {
            log.Error(e.Message);
            return ExitStatus.Usage;
        }
        catch (KvmUnavailableException e)
        {
            log.Error(e.Message);
            return ExitStatus.KvmUnavailable;
        }
        catch (KernelImageException e)
        {
            log.Error($"cannot boot: {e.Message}");
            return ExitStatus.BadImage;
        }
        catch (SyscallException e)
        {
            log.Error(e.Message);
            return ExitStatus.VmmError;
        }
        catch (Exception e)
        {
            // A bug in vmm: say so in one line; the stack trace only when asked for.
            log.Error($"internal error: {e.GetType().Name}: {e.Message}");
            log.Debug(e.ToString());
            return ExitStatus.VmmError;
        }
        finally
        {
            terminal?.Dispose();
            onTerm?.Dispose();
            onHup?.Dispose();
            if (options.Serial == SerialMode.File)
                serialOut?.Dispose();
        }
    }

    /// <summary>A guest reset restarts the VM under --on-reboot restart; everything else ends vmm.</summary>
    public static bool ShouldRestart(VmOutcome outcome, Options options) =>
        outcome.Kind == VmExitKind.Reset && options.OnReboot == RebootAction.Restart;

    private static int Report(VmOutcome outcome, Options options, Log log)
    {
        switch (outcome.Kind)
        {
            case VmExitKind.DebugExit:
                log.Info(outcome.Message);
                if (options.Demo)
                {
                    if (outcome.DebugExitValue == 0)
                        return ExitStatus.Success;
                    log.Error($"the demo guest reported failure ({outcome.DebugExitValue})");
                }
                return ExitStatus.FromDebugExit(outcome.DebugExitValue);
            case VmExitKind.PowerOff:
            case VmExitKind.Reset:
                log.Info(outcome.Message);
                return ExitStatus.Success;
            case VmExitKind.Halted:
                log.Error(outcome.Diagnostic ?? outcome.Message);
                return ExitStatus.GuestHalted;
            case VmExitKind.GuestCrash:
                log.Error(outcome.Diagnostic ?? outcome.Message);
                return ExitStatus.GuestCrashed;
            default:
                log.Error(outcome.Message);
                return ExitStatus.VmmError;
        }
    }

    private static BootFile ReadBootFile(string path, string option)
    {
        try
        {
            return new BootFile(path, File.ReadAllBytes(path));
        }
        catch (FileNotFoundException)
        {
            throw new UsageException($"{option} {path}: no such file");
        }
        catch (DirectoryNotFoundException)
        {
            throw new UsageException($"{option} {path}: no such file");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new UsageException($"{option} {path}: {e.Message}");
        }
    }

    /// <summary>stdin redirected from /dev/null: don't start a reader that would only see EOF.</summary>
    private static bool IsNullDevice()
    {
        try
        {
            return File.ResolveLinkTarget("/proc/self/fd/0", false)?.FullName == "/dev/null";
        }
        catch (IOException)
        {
            return false;
        }
    }
}
