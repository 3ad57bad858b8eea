using System.Buffers.Binary;
using BenchmarkDotNet.Attributes;
using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Machine;
using static Vmm.Interop.KvmConstants;
using Off = Vmm.Interop.KvmRunOffsets;

namespace Vmm.Benchmarks;

/// <summary>One <see cref="ExitDispatcher.Dispatch"/> call per operation, on a byte[] laid out like the mmapped
/// <c>kvm_run</c> page (offsets from <see cref="Off"/>), with the I/O bus populated as
/// <see cref="VirtualMachine"/> populates it. This is the user-space part of an exit only: no ioctl, no guest.
/// Every case must allocate 0 B (the vCPU loop's zero-allocation rule).</summary>
[MemoryDiagnoser]
public class ExitDispatchBenchmarks
{
    /// <summary>Where KVM puts PIO data: the page after struct kvm_run (KVM_PIO_PAGE_OFFSET = 1).</summary>
    private const int PioDataOffset = 4096;

    private ExitDispatcher _dispatcher = null!;
    private SerialConsole _console = null!;
    private readonly VcpuStats _stats = new();

    private readonly byte[] _postCodeOut = NewRun();
    private readonly byte[] _lsrIn = NewRun();
    private readonly byte[] _thrOut = NewRun();
    private readonly byte[] _thrOutDiscard = NewRun();
    private readonly byte[] _mmioWriteUnclaimed = NewRun();
    private readonly byte[] _mmioWriteClaimed = NewRun();
    private readonly byte[] _mmioReadClaimed = NewRun();

    [GlobalSetup]
    public void Setup()
    {
        var io = new Bus("I/O port");
        var mmio = new Bus("MMIO");
        _console = new SerialConsole(Stream.Null);
        var control = new NullVmControl();
        io.Insert(new Serial16550(new NullInterruptLine(), _console), 0x3F8, 8);
        io.Insert(new DebugExit(control), DebugExit.DefaultPort, DebugExit.Width);
        io.Insert(new I8042(control), I8042.DataPort, 5);
        io.Insert(new PostCodeSink(), PostCodeSink.DefaultPort, 1);
        io.Insert(new Serial16550(new NullInterruptLine(), output: null), 0x2F8, 8); // COM2, output discarded
        mmio.Insert(new ScratchRegisters(), 0xFED0_0000, 0x1000);
        _dispatcher = new ExitDispatcher(io, mmio);

        Pio(_postCodeOut, KVM_EXIT_IO_OUT, PostCodeSink.DefaultPort, 1, 0x42);
        Pio(_lsrIn, KVM_EXIT_IO_IN, 0x3FD, 1, 0);
        Pio(_thrOut, KVM_EXIT_IO_OUT, 0x3F8, 1, (byte)'x');
        Pio(_thrOutDiscard, KVM_EXIT_IO_OUT, 0x2F8, 1, (byte)'x');
        Mmio(_mmioWriteUnclaimed, 0xD000_0000, 4, isWrite: true);
        Mmio(_mmioWriteClaimed, 0xFED0_0010, 4, isWrite: true);
        Mmio(_mmioReadClaimed, 0xFED0_0010, 4, isWrite: false);
    }

    [GlobalCleanup]
    public void Cleanup() => _console.Dispose();

    /// <summary>out 0x80, al — the POST-code port (pio-loop.bin's exit).</summary>
    [Benchmark(Baseline = true)]
    public ExitAction PioOutPostCode() => _dispatcher.Dispatch(_postCodeOut, _stats);

    /// <summary>in al, 0x3fd — polling the UART line status register.</summary>
    [Benchmark]
    public ExitAction PioInUartLsr() => _dispatcher.Dispatch(_lsrIn, _stats);

    /// <summary>out 0x3f8, al — one transmitted byte into the console's ring buffer, drained to Stream.Null by
    /// the console's output thread (woken when the ring goes from empty to non-empty). MemoryDiagnoser counts
    /// every thread's allocations, that thread's included; <c>thread-alloc</c> separates the dispatching thread.</summary>
    [Benchmark]
    public ExitAction PioOutUartThr() => _dispatcher.Dispatch(_thrOut, _stats);

    /// <summary>out 0x2f8, al — the same THR write to a UART with no output attached: the UART emulation
    /// alone, without the hand-off to the console's output thread.</summary>
    [Benchmark]
    public ExitAction PioOutUartThrNoConsole() => _dispatcher.Dispatch(_thrOutDiscard, _stats);

    /// <summary>4-byte write to an unclaimed guest-physical address (mmio-loop.bin's exit): dropped and counted.</summary>
    [Benchmark]
    public ExitAction MmioWriteUnclaimed() => _dispatcher.Dispatch(_mmioWriteUnclaimed, _stats);

    /// <summary>4-byte write to a device on the MMIO bus.</summary>
    [Benchmark]
    public ExitAction MmioWriteClaimed() => _dispatcher.Dispatch(_mmioWriteClaimed, _stats);

    /// <summary>4-byte read from a device on the MMIO bus.</summary>
    [Benchmark]
    public ExitAction MmioReadClaimed() => _dispatcher.Dispatch(_mmioReadClaimed, _stats);

    /// <summary>kvm_run is mmapped with at least two pages: the struct, then the PIO data page.</summary>
    private static byte[] NewRun() => new byte[2 * 4096];

    private static void Pio(byte[] run, byte direction, ushort port, byte size, byte value)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(run.AsSpan(Off.exit_reason), KVM_EXIT_IO);
        run[Off.io_direction] = direction;
        run[Off.io_size] = size;
        BinaryPrimitives.WriteUInt16LittleEndian(run.AsSpan(Off.io_port), port);
        BinaryPrimitives.WriteUInt32LittleEndian(run.AsSpan(Off.io_count), 1);
        BinaryPrimitives.WriteUInt64LittleEndian(run.AsSpan(Off.io_data_offset), PioDataOffset);
        run[PioDataOffset] = value;
    }

    private static void Mmio(byte[] run, ulong address, uint length, bool isWrite)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(run.AsSpan(Off.exit_reason), KVM_EXIT_MMIO);
        BinaryPrimitives.WriteUInt64LittleEndian(run.AsSpan(Off.mmio_phys_addr), address);
        BinaryPrimitives.WriteUInt32LittleEndian(run.AsSpan(Off.mmio_data), 0xDEAD_BEEF);
        BinaryPrimitives.WriteUInt32LittleEndian(run.AsSpan(Off.mmio_len), length);
        run[Off.mmio_is_write] = isWrite ? (byte)1 : (byte)0;
    }
}

/// <summary>An interrupt line nobody listens to (the real one is a KVM_IRQ_LINE ioctl).</summary>
internal sealed class NullInterruptLine : IInterruptLine
{
    public void SetLevel(bool asserted)
    {
    }
}

/// <summary>Ignores the guest's requests to end the VM.</summary>
internal sealed class NullVmControl : IVmControl
{
    public void RequestDebugExit(uint value)
    {
    }

    public void RequestReset(string source)
    {
    }

    public void RequestPowerOff(string source)
    {
    }
}

/// <summary>A page of plain read/write registers: the cheapest possible MMIO device.</summary>
internal sealed class ScratchRegisters : IBusDevice
{
    private readonly byte[] _page = new byte[0x1000];

    public void Read(ulong offset, Span<byte> data) => _page.AsSpan((int)offset, data.Length).CopyTo(data);

    public void Write(ulong offset, ReadOnlySpan<byte> data) => data.CopyTo(_page.AsSpan((int)offset));
}
