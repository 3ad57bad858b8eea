using System.Runtime.InteropServices;
using Vmm.Interop;

namespace Vmm.Machine;

/// <summary>The signal that knocks a vCPU thread out of KVM_RUN (which then returns EINTR). A real-time signal
/// above the ones the .NET runtime and glibc use (SIGRTMIN is the runtime's activation signal).</summary>
internal static unsafe class KickSignal
{
    public const int Number = 40; // SIGRTMIN + 6 with glibc's SIGRTMIN of 34

    private static readonly Lock s_lock = new();
    private static bool s_installed;

    /// <summary>Installs a handler so the signal interrupts KVM_RUN instead of killing the process. The handler
    /// must be native and async-signal-safe, and any function taking one int will do: libc's getpid is both.
    /// A managed handler would need a GC transition inside a signal handler, which is not safe.</summary>
    public static void EnsureInstalled()
    {
        lock (s_lock)
        {
            if (s_installed)
                return;
            nint libc = NativeLibrary.Load("libc.so.6");
            nint handler = NativeLibrary.GetExport(libc, "getpid");
            Tmds.Linux.sigaction action = default;
            action.sa_handler = (void*)handler;
            action.sa_flags = 0; // no SA_RESTART: KVM_RUN must come back with EINTR
            Tmds.Linux.LibC.sigemptyset(&action.sa_mask);
            if (Tmds.Linux.LibC.sigaction(Number, &action, null) != 0)
                throw new SyscallException("sigaction", Errno.Last, $"signal {Number} for vCPU kicks");
            s_installed = true;
        }
    }
}
