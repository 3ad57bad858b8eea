using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using Vmm.Devices;
using static Vmm.Interop.KvmConstants;
using Off = Vmm.Interop.KvmRunOffsets;

namespace Vmm.Machine;

/// <summary>What the vCPU loop does after an exit.</summary>
public enum ExitAction
{
    /// <summary>Handled; enter the guest again.</summary>
    Continue,
    /// <summary>The guest executed HLT with nothing to wake it (only without an in-kernel irqchip).</summary>
    Halt,
    /// <summary>Triple fault: the CPU shut down.</summary>
    Shutdown,
    /// <summary>KVM could not enter the guest (invalid state).</summary>
    FailEntry,
    /// <summary>KVM could not emulate something (e.g. an instruction).</summary>
    InternalError,
    /// <summary>A system event (shutdown, reset, crash) from KVM.</summary>
    SystemEvent,
    /// <summary>An exit reason vmm does not handle, or a malformed kvm_run.</summary>
    Unhandled,
}

/// <summary>Counters of one vCPU (written only by its own thread).</summary>
public sealed class VcpuStats
{
    public long Exits;
    public long PioExits;
    public long MmioExits;
    public long InterruptedRuns;
    /// <summary>Managed bytes the vCPU thread allocated while handling exits that resumed the guest.</summary>
    public long ExitAllocatedBytes;
    public long UserCpuNs;
    public long SystemCpuNs;
    public long WallNs;
}

/// <summary>Decodes a <c>kvm_run</c> exit and dispatches port I/O and MMIO to the buses. The hot path: it
/// reads and writes the mmapped page through the span it is given, allocates nothing and never throws for
/// anything the guest does. Testable without KVM by handing it a byte array laid out like kvm_run.</summary>
public sealed class ExitDispatcher(Bus ioBus, Bus mmioBus)
{
    public Bus IoBus { get; } = ioBus;
    public Bus MmioBus { get; } = mmioBus;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public ExitAction Dispatch(Span<byte> run, VcpuStats stats)
    {
        stats.Exits++;
        uint reason = BinaryPrimitives.ReadUInt32LittleEndian(run[Off.exit_reason..]);
        switch (reason)
        {
            case KVM_EXIT_IO:
                stats.PioExits++;
                return HandleIo(run);
            case KVM_EXIT_MMIO:
                stats.MmioExits++;
                return HandleMmio(run);
            case KVM_EXIT_INTR:
            case KVM_EXIT_IRQ_WINDOW_OPEN:
                stats.InterruptedRuns++;
                return ExitAction.Continue;
            case KVM_EXIT_HLT:
                return ExitAction.Halt;
            case KVM_EXIT_SHUTDOWN:
                return ExitAction.Shutdown;
            case KVM_EXIT_FAIL_ENTRY:
                return ExitAction.FailEntry;
            case KVM_EXIT_INTERNAL_ERROR:
                return ExitAction.InternalError;
            case KVM_EXIT_SYSTEM_EVENT:
                return ExitAction.SystemEvent;
            default:
                return ExitAction.Unhandled;
        }
    }

    private ExitAction HandleIo(Span<byte> run)
    {
        byte direction = run[Off.io_direction];
        int size = run[Off.io_size];
        ushort port = BinaryPrimitives.ReadUInt16LittleEndian(run[Off.io_port..]);
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(run[Off.io_count..]);
        ulong dataOffset = BinaryPrimitives.ReadUInt64LittleEndian(run[Off.io_data_offset..]);
        // The kernel fills these, but a corrupt page must not make us touch memory outside it.
        if ((size != 1 && size != 2 && size != 4) || count == 0 || dataOffset >= (ulong)run.Length
            || (ulong)size * count > (ulong)run.Length - dataOffset)
            return ExitAction.Unhandled;
        // String I/O (rep outs/ins) arrives as count elements back to back in the data area.
        var data = run.Slice((int)dataOffset, size * (int)count);
        if (direction == KVM_EXIT_IO_OUT)
        {
            for (int i = 0; i < data.Length; i += size)
                IoBus.Write(port, data.Slice(i, size));
        }
        else
        {
            for (int i = 0; i < data.Length; i += size)
                IoBus.Read(port, data.Slice(i, size));
        }
        return ExitAction.Continue;
    }

    private ExitAction HandleMmio(Span<byte> run)
    {
        ulong address = BinaryPrimitives.ReadUInt64LittleEndian(run[Off.mmio_phys_addr..]);
        uint length = BinaryPrimitives.ReadUInt32LittleEndian(run[Off.mmio_len..]);
        if (length == 0 || length > 8)
            return ExitAction.Unhandled;
        var data = run.Slice(Off.mmio_data, (int)length);
        if (run[Off.mmio_is_write] != 0)
            MmioBus.Write(address, data);
        else
            MmioBus.Read(address, data);
        return ExitAction.Continue;
    }
}
