namespace Vmm.Machine;

public enum VmExitKind
{
    /// <summary>The guest wrote to the isa-debug-exit port.</summary>
    DebugExit,
    /// <summary>The guest powered off.</summary>
    PowerOff,
    /// <summary>The guest asked for a reset.</summary>
    Reset,
    /// <summary>A CPU halted with nothing to wake it (no in-kernel irqchip).</summary>
    Halted,
    /// <summary>Triple fault, failed entry, emulation failure or an exit vmm cannot handle.</summary>
    GuestCrash,
    /// <summary>vmm itself failed while the VM ran (an ioctl error).</summary>
    VmmError,
    /// <summary>The host ended the VM: vm.shutdown, vm.delete, vmm.shutdown or a signal.</summary>
    Stopped,
}

/// <summary>How a VM ended. <see cref="Diagnostic"/> holds the crash report (registers, disassembly) if any.</summary>
public sealed record VmOutcome(VmExitKind Kind, string Message, uint DebugExitValue = 0, string? Diagnostic = null);
