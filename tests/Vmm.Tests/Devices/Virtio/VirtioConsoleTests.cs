using System.Buffers.Binary;
using System.Text;
using Vmm.Devices.Legacy;
using Vmm.Devices.Virtio;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

public sealed class VirtioConsoleTests : IDisposable
{
    private readonly GuestMemory _memory = GuestMemory.Create(16 * MemoryLayout.MiB);
    private readonly DriverQueue _rx, _tx;
    private readonly RecordingVirtioInterrupts _interrupts = new();

    public VirtioConsoleTests()
    {
        _rx = new DriverQueue(_memory, 0x10000, 16);
        _tx = new DriverQueue(_memory, 0x20000, 16);
    }

    public void Dispose()
    {
        _rx.Dispose();
        _tx.Dispose();
        _memory.Dispose();
    }

    private VirtioConsole Start(VirtioConsole console)
    {
        console.Activate(DriverQueue.Context(_memory, 1UL << VirtioConsole.F_SIZE, _interrupts, _rx, _tx));
        return console;
    }

    private void Transmit(ulong address, string text)
    {
        var bytes = Encoding.ASCII.GetBytes(text);
        _memory.Write(new GuestAddress(address), bytes);
        int half = bytes.Length / 2;
        _tx.AddChain((address, (uint)half, false), (address + (uint)half, (uint)(bytes.Length - half), false));
        _tx.Kick.Signal();
    }

    [Fact]
    public void The_configuration_holds_80_columns_and_25_rows()
    {
        using var console = new VirtioConsole(null);
        Span<byte> config = stackalloc byte[4];
        console.ReadConfig(0, config);

        Assert.Equal(80, BinaryPrimitives.ReadUInt16LittleEndian(config));
        Assert.Equal(25, BinaryPrimitives.ReadUInt16LittleEndian(config[2..]));
        Assert.Equal(VirtioDeviceType.Console, console.Type);
    }

    [Fact]
    public void Guest_output_reaches_the_sink()
    {
        var sink = new RecordingByteSink();
        using var console = Start(new VirtioConsole(sink));

        Transmit(0x100000, "hello, console\n");

        Assert.True(_tx.WaitUsed(1));
        Assert.Equal(0u, _tx.Used(0).Length);
        Assert.Equal("hello, console\n", sink.Text);
        Assert.True(_interrupts.QueueInterrupts > 0);
    }

    [Fact]
    public void A_full_sink_holds_the_rest_until_it_makes_room()
    {
        var sink = new RecordingByteSink(capacity: 3);
        using var console = Start(new VirtioConsole(sink));

        Transmit(0x100000, "abcdefgh");
        Thread.Sleep(200);
        Assert.Equal(0, _tx.UsedIndex); // not completed: the rest is held, nothing dropped
        Assert.Equal("abc", sink.Text);

        sink.Drain(100);

        Assert.True(_tx.WaitUsed(1));
        Assert.Equal("abcdefgh", sink.Text);
    }

    [Fact]
    public void A_UART_and_the_console_share_one_sink_and_both_resume_after_it_drains()
    {
        var sink = new RecordingByteSink(capacity: 0);
        var uart = new Serial16550(new RecordingInterruptLine(), sink);
        using var console = Start(new VirtioConsole(sink));

        uart.Write(0, [(byte)'U']);
        Transmit(0x100000, "vc");
        Thread.Sleep(100);
        sink.Drain(100);

        Assert.True(_tx.WaitUsed(1));
        Assert.True(SpinWait.SpinUntil(() => sink.Text.Length == 3, TimeSpan.FromSeconds(10)));
        Assert.Contains("U", sink.Text);
        Assert.Contains("vc", sink.Text);
    }

    [Fact]
    public void Input_waits_for_a_receive_buffer_and_then_reaches_the_guest()
    {
        using var console = Start(new VirtioConsole(null));
        Assert.Equal(5, console.EnqueueInput("typed"u8));
        Thread.Sleep(50);

        _rx.AddChain((0x200000, 64, true));
        _rx.Kick.Signal();

        Assert.True(_rx.WaitUsed(1));
        Assert.Equal(5u, _rx.Used(0).Length);
        Assert.Equal("typed", Encoding.ASCII.GetString(_memory.GetSpan(new GuestAddress(0x200000), 5)));
    }

    [Fact]
    public void SerialConsole_input_can_feed_the_virtio_console()
    {
        using var serial = new SerialConsole(null);
        using var console = Start(new VirtioConsole(serial));
        _rx.AddChain((0x200000, 4, true));
        _rx.AddChain((0x201000, 64, true));
        _rx.Kick.Signal();

        serial.AttachInput(new MemoryStream(Encoding.ASCII.GetBytes("ls -l\n")), console);

        Assert.True(SpinWait.SpinUntil(() => console.BytesReceived == 6, TimeSpan.FromSeconds(10)));
        var text = new StringBuilder();
        for (int i = 0; i < _rx.UsedIndex; i++)
        {
            var (id, length) = _rx.Used(i);
            text.Append(Encoding.ASCII.GetString(_memory.GetSpan(new GuestAddress(id == 0 ? 0x200000UL : 0x201000UL), (int)length)));
        }
        Assert.Equal("ls -l\n", text.ToString());
    }

    [Fact]
    public void A_looping_transmit_chain_is_completed_with_0_and_output_goes_on()
    {
        var sink = new RecordingByteSink();
        using var console = Start(new VirtioConsole(sink));
        ushort loop = _tx.Reserve(1);
        _tx.WriteDescriptor(loop, 0x100000, 8, DriverQueue.FlagNext, loop);
        _tx.Publish(loop);

        Transmit(0x101000, "after");

        Assert.True(_tx.WaitUsed(2));
        Assert.Equal("after", sink.Text);
        Assert.Equal(1, console.BadChains);
    }
}
