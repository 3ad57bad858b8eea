using System.Text;
using Vmm.Devices.Legacy;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices;

public class SerialConsoleTests
{
    [Fact]
    public void Everything_the_UART_transmits_reaches_the_output_stream_by_dispose()
    {
        var output = new MemoryStream();
        var console = new SerialConsole(output);
        var uart = new Serial16550(new RecordingInterruptLine(), console);
        var text = string.Concat(Enumerable.Repeat("line of guest output\n", 500));
        foreach (char c in text)
            uart.Write(0, [(byte)c]);
        console.Dispose();
        Assert.Equal(text, Encoding.ASCII.GetString(output.ToArray()));
    }

    private sealed class BrokenStream : Stream
    {
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => 0;
        public override long Position { get; set; }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => 0;
        public override long Seek(long offset, SeekOrigin origin) => 0;
        public override void SetLength(long value) { }
        public override void Write(byte[] buffer, int offset, int count) => throw new IOException("Broken pipe");
    }

    [Fact]
    public void A_broken_output_stream_does_not_stop_the_guest()
    {
        var console = new SerialConsole(new BrokenStream());
        var uart = new Serial16550(new RecordingInterruptLine(), console);
        for (int i = 0; i < 10_000; i++)
            uart.Write(0, [(byte)'x']);
        console.Dispose();
        Assert.True(console.OutputFailed);
        Assert.Equal(10_000, uart.BytesTransmitted);
    }

    [Fact]
    public void Input_stream_bytes_reach_the_guest_in_order()
    {
        var console = new SerialConsole(null);
        var uart = new Serial16550(new RecordingInterruptLine(), console);
        console.AttachInput(new MemoryStream(Encoding.ASCII.GetBytes("typed line\n")), uart);
        var received = new StringBuilder();
        var deadline = DateTime.UtcNow.AddSeconds(10);
        var b = new byte[1];
        while (received.Length < 11 && DateTime.UtcNow < deadline)
        {
            uart.Read(5, b);
            if ((b[0] & 1) != 0)
            {
                uart.Read(0, b);
                received.Append((char)b[0]);
            }
            else
            {
                Thread.Sleep(1);
            }
        }
        console.Dispose();
        Assert.Equal("typed line\n", received.ToString());
    }

    [Theory]
    [InlineData(new byte[] { (byte)'a', 1, (byte)'x', (byte)'b' }, new byte[] { (byte)'a' }, true, false)]
    [InlineData(new byte[] { 1, 1, (byte)'q' }, new byte[] { 1, (byte)'q' }, false, false)]
    [InlineData(new byte[] { 1, (byte)'h' }, new byte[] { 1, (byte)'h' }, false, false)]
    [InlineData(new byte[] { (byte)'z', 1 }, new byte[] { (byte)'z' }, false, true)]
    public void Ctrl_A_escape_quits_on_x_and_passes_everything_else(byte[] input, byte[] forGuest, bool quits, bool pendingAfter)
    {
        var output = new byte[input.Length * 2];
        bool pending = false;
        int n = SerialConsole.ApplyEscape(input, output, ref pending, out bool quit);
        Assert.Equal(forGuest, output[..n]);
        Assert.Equal((quits, pendingAfter), (quit, pending));
    }

    [Fact]
    public void Ctrl_A_split_across_reads_still_escapes()
    {
        var output = new byte[8];
        bool pending = false;
        Assert.Equal(0, SerialConsole.ApplyEscape([1], output, ref pending, out _));
        int n = SerialConsole.ApplyEscape([(byte)'k', (byte)'m'], output, ref pending, out bool quit);
        Assert.Equal(new byte[] { 1, (byte)'k', (byte)'m' }, output[..n]);
        Assert.False(quit);
    }

    [Fact]
    public void Ctrl_A_x_from_the_input_stream_calls_quit_after_delivering_earlier_keys()
    {
        var console = new SerialConsole(null);
        var uart = new Serial16550(new RecordingInterruptLine(), console);
        using var quit = new ManualResetEventSlim();
        console.AttachInput(new MemoryStream([(byte)'o', (byte)'k', 1, (byte)'x', (byte)'!']), uart, quit.Set);
        Assert.True(quit.Wait(TimeSpan.FromSeconds(10)));
        var b = new byte[1];
        uart.Read(0, b);
        Assert.Equal((byte)'o', b[0]);
        uart.Read(0, b);
        Assert.Equal((byte)'k', b[0]);
        uart.Read(5, b);
        Assert.Equal(0, b[0] & 1); // '!' after the escape never reached the guest
        console.Dispose();
    }
}
