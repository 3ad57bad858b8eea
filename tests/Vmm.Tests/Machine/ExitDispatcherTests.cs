using System.Buffers.Binary;
using Vmm.Devices;
using Vmm.Devices.Legacy;
using Vmm.Machine;
using Vmm.Tests.TestKit;
using static Vmm.Interop.KvmConstants;
using Off = Vmm.Interop.KvmRunOffsets;

namespace Vmm.Tests.Machine;

/// <summary>Exit dispatch on a byte array laid out like <c>kvm_run</c>: no KVM needed.</summary>
public class ExitDispatcherTests
{
    private sealed class Recorder : IBusDevice
    {
        public List<(char Op, ulong Offset, byte[] Data)> Accesses { get; } = [];
        public byte Fill { get; set; } = 0xAB;
        public void Read(ulong offset, Span<byte> data) { data.Fill(Fill); Accesses.Add(('r', offset, data.ToArray())); }
        public void Write(ulong offset, ReadOnlySpan<byte> data) => Accesses.Add(('w', offset, data.ToArray()));
    }

    private readonly byte[] _run = new byte[4096];
    private readonly Bus _io = new("I/O port");
    private readonly Bus _mmio = new("MMIO");
    private readonly Recorder _port = new();
    private readonly Recorder _mmioDevice = new();
    private readonly ExitDispatcher _dispatcher;
    private readonly VcpuStats _stats = new();

    public ExitDispatcherTests()
    {
        _io.Insert(_port, 0x10, 4);
        _mmio.Insert(_mmioDevice, 0xD000_0000, 0x1000);
        _dispatcher = new ExitDispatcher(_io, _mmio);
    }

    private void SetIo(byte direction, byte size, ushort port, uint count, ulong dataOffset = 0x800)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(_run.AsSpan(Off.exit_reason), KVM_EXIT_IO);
        _run[Off.io_direction] = direction;
        _run[Off.io_size] = size;
        BinaryPrimitives.WriteUInt16LittleEndian(_run.AsSpan(Off.io_port), port);
        BinaryPrimitives.WriteUInt32LittleEndian(_run.AsSpan(Off.io_count), count);
        BinaryPrimitives.WriteUInt64LittleEndian(_run.AsSpan(Off.io_data_offset), dataOffset);
    }

    private void SetMmio(ulong address, uint length, bool write)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(_run.AsSpan(Off.exit_reason), KVM_EXIT_MMIO);
        BinaryPrimitives.WriteUInt64LittleEndian(_run.AsSpan(Off.mmio_phys_addr), address);
        BinaryPrimitives.WriteUInt32LittleEndian(_run.AsSpan(Off.mmio_len), length);
        _run[Off.mmio_is_write] = write ? (byte)1 : (byte)0;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void Port_output_of_each_width_reaches_the_device(byte size)
    {
        SetIo(KVM_EXIT_IO_OUT, size, 0x11, 1);
        for (int i = 0; i < size; i++)
            _run[0x800 + i] = (byte)(0x10 + i);
        Assert.Equal(ExitAction.Continue, _dispatcher.Dispatch(_run, _stats));
        var (op, offset, data) = Assert.Single(_port.Accesses);
        Assert.Equal(('w', 1UL), (op, offset));
        Assert.Equal(_run.AsSpan(0x800, size).ToArray(), data);
        Assert.Equal(1, _stats.PioExits);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void Port_input_of_each_width_is_written_into_the_run_page(byte size)
    {
        SetIo(KVM_EXIT_IO_IN, size, 0x12, 1);
        _dispatcher.Dispatch(_run, _stats);
        Assert.All(_run.AsSpan(0x800, size).ToArray(), b => Assert.Equal(0xAB, b));
        Assert.Equal(0, _run[0x800 + size]);
    }

    [Fact]
    public void String_IO_dispatches_every_element()
    {
        SetIo(KVM_EXIT_IO_OUT, 1, 0x10, 5);
        "hello"u8.CopyTo(_run.AsSpan(0x800));
        _dispatcher.Dispatch(_run, _stats);
        Assert.Equal("hello"u8.ToArray(), _port.Accesses.SelectMany(a => a.Data).ToArray());

        _port.Accesses.Clear();
        SetIo(KVM_EXIT_IO_IN, 2, 0x10, 3);
        _dispatcher.Dispatch(_run, _stats);
        Assert.Equal(3, _port.Accesses.Count);
        Assert.All(_port.Accesses, a => Assert.Equal(2, a.Data.Length));
    }

    [Fact]
    public void Unclaimed_port_reads_all_ones()
    {
        SetIo(KVM_EXIT_IO_IN, 4, 0x300, 1);
        Assert.Equal(ExitAction.Continue, _dispatcher.Dispatch(_run, _stats));
        Assert.Equal(0xFFFFFFFFu, BinaryPrimitives.ReadUInt32LittleEndian(_run.AsSpan(0x800)));
        Assert.Equal(1, _io.UnclaimedReads);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    [InlineData(8)]
    public void MMIO_of_each_width_reaches_the_device(uint length)
    {
        SetMmio(0xD000_0010, length, write: true);
        _run.AsSpan(Off.mmio_data, 8).Fill(0x77);
        _dispatcher.Dispatch(_run, _stats);
        SetMmio(0xD000_0020, length, write: false);
        _run.AsSpan(Off.mmio_data, 8).Clear();
        _dispatcher.Dispatch(_run, _stats);
        Assert.Equal(('w', 0x10UL, (int)length), (_mmioDevice.Accesses[0].Op, _mmioDevice.Accesses[0].Offset, _mmioDevice.Accesses[0].Data.Length));
        Assert.Equal(('r', 0x20UL, (int)length), (_mmioDevice.Accesses[1].Op, _mmioDevice.Accesses[1].Offset, _mmioDevice.Accesses[1].Data.Length));
        Assert.Equal(Enumerable.Repeat((byte)0xAB, (int)length), _run.AsSpan(Off.mmio_data, (int)length).ToArray());
        Assert.Equal(2, _stats.MmioExits);
    }

    [Theory]
    [InlineData(3, 1u, 0x800UL)]    // impossible width
    [InlineData(1, 0u, 0x800UL)]    // no elements
    [InlineData(4, 1u, 4094UL)]     // data runs off the page
    [InlineData(4, 1u, 1UL << 40)]  // data offset far outside the page
    [InlineData(1, 0x8000_0000u, 0x800UL)] // huge count
    public void Malformed_IO_exits_are_refused_without_touching_memory_outside_the_page(byte size, uint count, ulong dataOffset)
    {
        SetIo(KVM_EXIT_IO_OUT, size, 0x10, count, dataOffset);
        Assert.Equal(ExitAction.Unhandled, _dispatcher.Dispatch(_run, _stats));
        Assert.Empty(_port.Accesses);
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(9u)]
    public void Malformed_MMIO_lengths_are_refused(uint length)
    {
        SetMmio(0xD000_0000, length, write: true);
        Assert.Equal(ExitAction.Unhandled, _dispatcher.Dispatch(_run, _stats));
        Assert.Empty(_mmioDevice.Accesses);
    }

    [Theory]
    [InlineData(KVM_EXIT_HLT, ExitAction.Halt)]
    [InlineData(KVM_EXIT_SHUTDOWN, ExitAction.Shutdown)]
    [InlineData(KVM_EXIT_FAIL_ENTRY, ExitAction.FailEntry)]
    [InlineData(KVM_EXIT_INTERNAL_ERROR, ExitAction.InternalError)]
    [InlineData(KVM_EXIT_SYSTEM_EVENT, ExitAction.SystemEvent)]
    [InlineData(KVM_EXIT_INTR, ExitAction.Continue)]
    [InlineData(999u, ExitAction.Unhandled)]
    public void Exit_reasons_map_to_actions(uint reason, ExitAction expected)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(_run.AsSpan(Off.exit_reason), reason);
        Assert.Equal(expected, _dispatcher.Dispatch(_run, _stats));
    }

    [Fact]
    public void Ten_thousand_port_and_MMIO_exits_allocate_nothing()
    {
        // The real devices on the hot path: the UART (with its console pipe) and the POST-code port.
        var console = new SerialConsole(Stream.Null);
        var io = new Bus("I/O port");
        io.Insert(new Serial16550(new RecordingInterruptLine(), console), 0x3F8, 8);
        io.Insert(new PostCodeSink(), 0x80, 1);
        var mmio = new Bus("MMIO");
        mmio.Insert(new PostCodeSink(), 0xD000_0000, 0x1000);
        var dispatcher = new ExitDispatcher(io, mmio);
        var thread = new Thread(() =>
        {
            // Warm up until the JIT's tiering and the pipe's segment pool have settled (NativeAOT vmm has
            // no JIT at all), then measure 10,000 exits on this thread only.
            for (int round = 0; round < 5; round++)
            {
                for (int i = 0; i < 20_000; i++)
                    RunMix(dispatcher, i);
                Thread.Sleep(100);
            }
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < 10_000; i++)
                RunMix(dispatcher, i);
            _allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        });
        thread.Start();
        thread.Join();
        console.Dispose();
        Assert.Equal(0, _allocated);
        Assert.True(_stats.Exits >= 110_000);
    }

    private long _allocated = -1;

    private void RunMix(ExitDispatcher dispatcher, int i)
    {
        switch (i % 4)
        {
            case 0: SetIo(KVM_EXIT_IO_OUT, 1, 0x80, 1); break;
            case 1: SetIo(KVM_EXIT_IO_IN, 1, 0x3FD, 1); break;           // UART LSR
            case 2: SetIo(KVM_EXIT_IO_OUT, 1, 0x3F8, 1); _run[0x800] = (byte)'.'; break; // UART THR
            default: SetMmio(0xD000_0000, 4, write: (i & 8) != 0); break;
        }
        dispatcher.Dispatch(_run, _stats);
    }

    [Fact]
    public void Sustained_serial_output_allocates_nothing_on_the_writing_thread()
    {
        var console = new SerialConsole(Stream.Null);
        var uart = new Serial16550(new RecordingInterruptLine(), console);
        long allocated = -1;
        var thread = new Thread(() =>
        {
            ReadOnlySpan<byte> b = [(byte)'.'];
            for (int i = 0; i < 200_000; i++)
                uart.Write(0, b);
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < 4_000_000; i++) // four times the console buffer
                uart.Write(0, b);
            allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        });
        thread.Start();
        thread.Join();
        console.Dispose();
        Assert.Equal(0, allocated);
    }
}
