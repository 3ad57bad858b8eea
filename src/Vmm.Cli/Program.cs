using System.Runtime.InteropServices;
using Vmm.Boot;
using Vmm.Interop;
using Vmm.Interop.Seccomp;
using Vmm.Kvm;
using Vmm.Api;
using Vmm.Api.Http;
using Vmm.Machine;

namespace Vmm.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "remote")
            return RemoteCommand.Run(args[1..]);
        if (args.Length > 0 && args[0] == "jail")
        {
            if (args.Length == 1 || args[1] is "-h" or "--help")
            {
                Console.Out.WriteLine(Jail.JailOptions.HelpText);
                return args.Length == 1 ? ExitStatus.Usage : ExitStatus.Success;
            }
            return Jail.Jailer.Run(args[1..]);
        }
        if (args.Length > 0 && args[0] == Jail.Jailer.ChildCommand)
            return Jail.Jailer.Child(args[1..]);
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
        if (Environment.GetEnvironmentVariable(Jail.Jailer.ProbeVariable) is { Length: > 0 } probe)
            JailProbe(probe);
        RawTerminal? terminal = null;
        var signals = new List<PosixSignalRegistration>();
        EventMonitor? events = null;
        VmmService? service = null;
        HttpServer? server = null;
        var opened = new List<Stream>();
        try
        {
            // First: every thread vmm and the runtime start from here on runs under a filter (SeccompFilters.cs).
            // Only when vmm is the process: Program.Main called in-process (the CLI tests) must not filter its host.
            if (System.Reflection.Assembly.GetEntryAssembly() == typeof(Program).Assembly)
            {
                Seccomp.Configure(options.Seccomp, SeccompFilters.All(Sys.RunsOnCoreClr));
                Seccomp.InstallProcess("main");
            }
            if (Seccomp.Mode != SeccompMode.Off)
                log.Info($"seccomp: filters installed ({(Seccomp.Mode == SeccompMode.On ? "on" : "log")})");
            events = options.EventMonitor is null ? null : EventMonitor.Open(options.EventMonitor, log);
            events?.Emit("vmm", "starting");
            var onReset = options.OnRebootGiven || !options.ApiOnly
                ? (options.OnReboot == RebootAction.Restart ? ResetAction.Reboot : ResetAction.Shutdown)
                : ResetAction.Reboot; // an API-only vmm reboots on a guest reset, as Cloud Hypervisor does
            ConsoleStreams OpenConsole(VmConfig c)
            {
                var (streams, raw) = OpenConsoleStreams(c, log, opened);
                terminal ??= raw;
                return streams;
            }
            service = new VmmService(log, events, OpenConsole, onReset,
                adjust: m => options.NoIrqchip ? m with { InKernelIrqchip = false } : m,
                builtInKernel: options.Demo ? DemoGuest.Build() : null);
            var svc = service;
            // An orderly stop on SIGTERM, SIGINT (a terminal in raw mode sends none: Ctrl-C goes to the guest) and
            // SIGHUP: the VM is stopped and everything released, as vm.shutdown + vmm.shutdown would.
            foreach (var signal in new[] { PosixSignal.SIGTERM, PosixSignal.SIGINT, PosixSignal.SIGHUP })
            {
                signals.Add(PosixSignalRegistration.Create(signal, ctx =>
                {
                    ctx.Cancel = true;
                    terminal?.Dispose();
                    log.Info($"{ctx.Signal}: stopping the VM");
                    ThreadPool.UnsafeQueueUserWorkItem(_ => svc.ShutdownVmm(ExitStatus.Success), null);
                }));
            }
            if (options.ApiSocket is not null)
            {
                server = StartApi(options.ApiSocket, new ApiHandler(service, log), log);
                log.Info($"API on {server.Path ?? options.ApiSocket}");
            }
            if (options.ApiOnly)
                return service.ExitRequested.GetAwaiter().GetResult();

            // The flags' files are checked here so that an error names the flag, not the VmConfig field it became.
            if (options.Kernel is not null)
                ReadBootFile(options.Kernel, "--kernel");
            if (options.Initrd is not null)
                ReadBootFile(options.Initrd, "--initrd");
            var config = options.ConfigFile is not null ? ReadConfigFile(options.ConfigFile) : CliVmConfig.From(options);
            try
            {
                service.Create(config);
            }
            catch (ApiException e)
            {
                throw new ConfigException(string.Join(": ", e.Messages.Skip(2)));
            }
            var lifecycle = service.Lifecycle!;
            lifecycle.Boot(); // errors keep their types: each has its exit status
            if (server is not null)
            {
                // The API controls the VM from here: the process ends with vmm.shutdown or a signal.
                return service.ExitRequested.GetAwaiter().GetResult();
            }
            var outcome = lifecycle.Ended.GetAwaiter().GetResult();
            if ((options.Stats || log.IsEnabled(LogLevel.Debug)) && lifecycle.LastStats is { } stats)
                Console.Error.WriteLine(string.Join('\n', stats.Split('\n').Select(l => "vmm: stats: " + l)));
            return Report(outcome, options, log);
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
        catch (ApiSocketException e)
        {
            log.Error($"--api-socket: {e.Message}");
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
            server?.Dispose(); // the socket file goes first: nobody must find a socket that no longer answers
            service?.Dispose();
            events?.Dispose();
            terminal?.Dispose();
            foreach (var s in signals)
                s.Dispose();
            foreach (var s in opened)
                s.Dispose();
        }
    }

    /// <summary>The jail test's hook: tries to open each comma-separated path (read-only; with a leading '+', created for
    /// writing) and prints what happened, one line each, before the VM starts.</summary>
    private static void JailProbe(string paths)
    {
        foreach (string entry in paths.Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            bool create = entry.StartsWith('+');
            string path = create ? entry[1..] : entry;
            int fd = Sys.Open(path, create ? 0x41 | Sys.O_CLOEXEC : Sys.O_RDONLY | Sys.O_CLOEXEC); // O_WRONLY|O_CREAT
            int errno = fd < 0 ? Errno.Last : 0;
            Sys.Close(fd);
            Console.Error.WriteLine($"vmm: jail probe: {(create ? "create" : "open")} {path}: {(fd >= 0 ? "opened" : Errno.Describe(errno))}");
        }
    }

    /// <summary>`--api-socket path=PATH`, `fd=N` (an inherited socket, bound by the caller) or a bare path.</summary>
    private static HttpServer StartApi(string spec, ApiHandler handler, Log log)
    {
        Action<string> httpLog = m => log.Debug($"api: {m}");
        if (spec.StartsWith("fd=", StringComparison.Ordinal))
        {
            if (!int.TryParse(spec.AsSpan(3), out int fd) || fd < 0)
                throw new UsageException($"--api-socket {spec}: fd must be a file descriptor number");
            return HttpServer.FromListeningFd(fd, handler, log: httpLog);
        }
        string path = spec.StartsWith("path=", StringComparison.Ordinal) ? spec[5..] : spec;
        return HttpServer.Listen(path, handler, log: httpLog);
    }

    /// <summary>A VmConfig file is at most what the API takes as a vm.create body.</summary>
    private const long MaxConfigBytes = 1 << 20;

    private static VmConfig ReadConfigFile(string path)
    {
        byte[] json;
        try
        {
            json = HostFile.ReadRegular(path, MaxConfigBytes);
        }
        catch (HostFileException e)
        {
            throw new UsageException($"--config {path}: {e.Message}");
        }
        try
        {
            return ApiHandler.ParseVmConfig(json);
        }
        catch (VmConfigException e)
        {
            throw new UsageException($"--config {path}: {string.Join("; ", e.Problems)}");
        }
    }

    /// <summary>The console streams a VmConfig asks for: Tty is this process's stdout (and stdin, put in raw mode when it
    /// is a terminal), File appends to the file; Off and Null discard.</summary>
    private static (ConsoleStreams, RawTerminal?) OpenConsoleStreams(VmConfig c, Log log, List<Stream> opened)
    {
        var serial = c.Serial!;
        var console = c.Console!;
        string mode = serial.Mode is "Tty" or "File" ? serial.Mode : console.Mode;
        string? file = serial.Mode == "File" ? serial.File : console.File;
        switch (mode)
        {
            case "Tty":
            {
                var output = Console.OpenStandardOutput();
                Stream? input = Console.IsInputRedirected && IsNullDevice() ? null : Console.OpenStandardInput();
                RawTerminal? terminal = null;
                if (!Console.IsInputRedirected)
                {
                    // An interactive terminal: raw mode so every key (Ctrl-C too) reaches the guest; Ctrl-A x quits.
                    terminal = RawTerminal.TryEnter(0);
                    if (terminal is not null)
                        log.Info("console: raw terminal; press Ctrl-A x to quit");
                }
                return (new ConsoleStreams(output, input, terminal is not null), terminal);
            }
            case "File":
                try
                {
                    var stream = new FileStream(HostFile.OpenForAppend(file!), FileAccess.Write);
                    opened.Add(stream);
                    return (new ConsoleStreams(stream, null), null);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    throw new ConfigException($"--serial file:{file}: {e.Message}");
                }
            default:
                return (new ConsoleStreams(null, null), null);
        }
    }

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
            case VmExitKind.Stopped:
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
            return new BootFile(path, HostFile.ReadRegular(path, BootFile.MaxBytes));
        }
        catch (HostFileException e)
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
