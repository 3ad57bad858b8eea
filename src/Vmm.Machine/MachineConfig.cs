using Vmm.Boot;

namespace Vmm.Machine;

/// <summary>Everything needed to assemble one VM. Validated by <see cref="Validate"/> before any KVM call.</summary>
public sealed record MachineConfig
{
    public const ulong DefaultMemory = 128 * 1024 * 1024;
    public const ulong MaxMemory = 4UL << 40;

    public required BootFile Kernel { get; init; }
    public BootFile? Module { get; init; }
    public string Arguments { get; init; } = "";
    public ulong MemoryBytes { get; init; } = DefaultMemory;
    public int Cpus { get; init; } = 1;

    /// <summary>Where the COM1 output goes; null discards it.</summary>
    public Stream? SerialOutput { get; init; }

    /// <summary>What COM1 receives; null for nothing.</summary>
    public Stream? SerialInput { get; init; }

    /// <summary>The input is an interactive terminal: Ctrl-A x on it powers the VM off (QEMU's console escape).</summary>
    public bool ConsoleEscape { get; init; }

    /// <summary>The in-kernel PIC/IOAPIC/LAPIC and PIT. Without it interrupts cannot be delivered and HLT exits to vmm.</summary>
    public bool InKernelIrqchip { get; init; } = true;

    public string KvmPath { get; init; } = "/dev/kvm";

    public void Validate()
    {
        if (Cpus < 1)
            throw new ConfigException($"--cpus must be at least 1, not {Cpus}");
        if (MemoryBytes < 2 * 1024 * 1024)
            throw new ConfigException($"--memory must be at least 2 MiB, not {MemoryBytes} bytes");
        if (MemoryBytes % 4096 != 0)
            throw new ConfigException($"--memory must be a multiple of 4 KiB, not {MemoryBytes} bytes");
        // KVM caps one memory slot at 2^31 - 1 pages (just under 8 TiB); vmm uses one slot above 4 GiB.
        if (MemoryBytes > MaxMemory)
            throw new ConfigException($"--memory {MemoryBytes >> 30} GiB is beyond the {MaxMemory >> 40} TiB vmm supports");
        if (Cpus > 1 && !InKernelIrqchip)
            throw new ConfigException("--cpus above 1 needs the in-kernel irqchip: without it KVM starts every vCPU at the reset vector instead of waiting for INIT/SIPI (drop --no-irqchip)");
    }
}

/// <summary>An invalid machine configuration; the message says which option and why.</summary>
public sealed class ConfigException(string message) : Exception(message);
