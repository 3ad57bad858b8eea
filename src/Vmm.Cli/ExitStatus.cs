namespace Vmm.Cli;

/// <summary>vmm's process exit statuses. A guest's debug-exit value v gives (v &lt;&lt; 1) | 1, always odd, so every
/// status vmm itself chooses is even and the two can never be confused.</summary>
public static class ExitStatus
{
    /// <summary>The guest powered off or reset (or the demo guest reported success).</summary>
    public const int Success = 0;
    /// <summary>Bad command line or configuration.</summary>
    public const int Usage = 2;
    /// <summary>/dev/kvm is missing, not permitted, or lacks a capability vmm needs.</summary>
    public const int KvmUnavailable = 4;
    /// <summary>The kernel or initrd cannot be loaded (malformed, does not fit).</summary>
    public const int BadImage = 6;
    /// <summary>The guest crashed: triple fault, failed entry, KVM internal error, unhandled exit.</summary>
    public const int GuestCrashed = 8;
    /// <summary>A vCPU halted with nothing to wake it.</summary>
    public const int GuestHalted = 10;
    /// <summary>vmm failed (an ioctl or system call error while setting up or running the VM).</summary>
    public const int VmmError = 12;

    public static int FromDebugExit(uint value) => (int)(((value << 1) | 1) & 0xFF);
}
