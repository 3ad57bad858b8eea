using Vmm.Devices.Legacy;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices;

public class Serial16550Tests
{
    private const int RBR = 0, THR = 0, IER = 1, IIR = 2, FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7;

    private readonly RecordingInterruptLine _irq = new();
    private readonly RecordingByteSink _sink = new();
    private readonly Serial16550 _uart;

    public Serial16550Tests() => _uart = new Serial16550(_irq, _sink);

    private byte In(int reg)
    {
        Span<byte> b = stackalloc byte[1];
        _uart.Read((ulong)reg, b);
        return b[0];
    }

    private void Out(int reg, byte value) => _uart.Write((ulong)reg, [value]);

    private string Transmitted() => _sink.Text;

    [Fact]
    public void Idle_state_matches_the_datasheet_reset_values()
    {
        Assert.Equal(0x60, In(LSR));   // THRE | TEMT
        Assert.Equal(0x01, In(IIR));   // no interrupt pending, FIFOs off
        Assert.Equal(0x00, In(IER));
        Assert.Equal(0xB0, In(MSR));   // DCD | DSR | CTS: a connected line
        Assert.False(_irq.Level);
    }

    [Fact]
    public void Transmitted_bytes_reach_the_output_and_THR_is_empty_again()
    {
        foreach (char c in "hi\n")
            Out(THR, (byte)c);
        Assert.Equal(0x60, In(LSR) & 0x60);
        Assert.Equal("hi\n", Transmitted());
        Assert.Equal(3, _uart.BytesTransmitted);
    }

    [Fact]
    public void Scratch_register_round_trips()
    {
        Out(SCR, 0xA5);
        Assert.Equal(0xA5, In(SCR));
    }

    [Fact]
    public void Divisor_latch_is_reached_through_DLAB_and_hides_THR_and_IER()
    {
        Out(LCR, 0x83);
        Out(0, 0x01);
        Out(1, 0x02);
        Assert.Equal(0x01, In(0));
        Assert.Equal(0x02, In(1));
        Out(LCR, 0x03);
        Assert.Equal(0x00, In(IER)); // IER untouched by the DLM write
        Assert.Equal("", Transmitted()); // the DLL write was not transmitted
    }

    [Fact]
    public void Loopback_returns_transmitted_bytes_and_mirrors_modem_lines()
    {
        Out(MCR, 0x10 | 0x01 | 0x02); // loop, DTR, RTS
        Out(THR, 0x42);
        Assert.Equal(0x01, In(LSR) & 0x01);
        Assert.Equal(0x42, In(RBR));
        Assert.Equal(0x00, In(LSR) & 0x01);
        byte msr = In(MSR);
        Assert.Equal(0x30, msr & 0xF0);  // CTS (from RTS) and DSR (from DTR); no RI, no DCD
        Assert.Equal("", Transmitted()); // nothing left the UART
    }

    [Fact]
    public void Loopback_overrun_sets_OE_without_FIFO()
    {
        Out(MCR, 0x10);
        Out(THR, 1);
        Out(THR, 2);
        byte lsr = In(LSR);
        Assert.Equal(0x03, lsr & 0x03); // DR | OE
        Assert.Equal(0x00, In(LSR) & 0x02); // OE clears on read
        Assert.Equal(1, In(RBR));
    }

    [Fact]
    public void FCR_enables_FIFOs_reported_in_IIR_bits_7_6()
    {
        Out(FCR, 0x07);
        Assert.Equal(0xC1, In(IIR));
        Out(FCR, 0x00);
        Assert.Equal(0x01, In(IIR));
    }

    [Fact]
    public void Enabling_THRE_interrupt_raises_it_and_reading_IIR_acknowledges_it()
    {
        Out(IER, 0x02);
        Assert.True(_irq.Level);
        Assert.Equal(0x02, In(IIR));
        Assert.False(_irq.Level);
        Assert.Equal(0x01, In(IIR));
        Out(THR, (byte)'x'); // the next transmission empties THR again
        Assert.True(_irq.Level);
        Assert.Equal(2, _irq.RisingEdges);
    }

    [Fact]
    public void Received_data_raises_RDA_and_reading_RBR_clears_it()
    {
        Out(IER, 0x01);
        Assert.Equal(2, _uart.EnqueueInput("ab"u8));
        Assert.True(_irq.Level);
        Assert.Equal(0x04, In(IIR));
        Assert.Equal((byte)'a', In(RBR));
        Assert.True(_irq.Level); // 'b' moved from the host queue into the receiver
        Assert.Equal((byte)'b', In(RBR));
        Assert.False(_irq.Level);
        Assert.Equal(0, In(LSR) & 1);
    }

    [Fact]
    public void FIFO_below_the_trigger_level_reports_a_character_timeout()
    {
        Out(FCR, 0x81); // FIFO on, trigger 8
        Out(IER, 0x01);
        _uart.EnqueueInput("abc"u8);
        Assert.Equal(0xCC, In(IIR));
        _uart.EnqueueInput("defgh"u8);
        Assert.Equal(0xC4, In(IIR));
    }

    [Fact]
    public void RDA_has_priority_over_THRE()
    {
        Out(IER, 0x03);
        _uart.EnqueueInput("z"u8);
        Assert.Equal(0x04, In(IIR));
        In(RBR);
        Assert.Equal(0x02, In(IIR));
    }

    [Fact]
    public void Host_input_beyond_the_FIFO_waits_in_the_queue_and_is_never_lost()
    {
        Out(FCR, 0x01);
        var input = Enumerable.Range(0, 1000).Select(i => (byte)i).ToArray();
        Assert.Equal(1000, _uart.EnqueueInput(input));
        var received = new List<byte>();
        while ((In(LSR) & 1) != 0)
            received.Add(In(RBR));
        Assert.Equal(input, received);
        Assert.Equal(0, In(LSR) & 0x02); // no overrun
    }

    [Fact]
    public void Host_input_queue_applies_back_pressure_when_full()
    {
        var big = new byte[Serial16550.InputQueueCapacity + 100];
        Assert.Equal(Serial16550.InputQueueCapacity, _uart.EnqueueInput(big));
        // One byte moved on into the receiver, so exactly one more fits; then none.
        Assert.Equal(1, _uart.EnqueueInput(big));
        Assert.Equal(0, _uart.EnqueueInput(big));
        Assert.Equal(0, _uart.InputSpace);
    }

    [Fact]
    public void Modem_status_interrupt_reports_loopback_line_changes()
    {
        Out(MCR, 0x10);
        In(MSR); // clear deltas
        Out(IER, 0x08);
        Out(MCR, 0x10 | 0x02); // RTS → CTS changes
        Assert.True(_irq.Level);
        Assert.Equal(0x00, In(IIR));
        Assert.Equal(0x11, In(MSR) & 0x11); // CTS and DCTS
        Assert.False(_irq.Level);
    }

    [Fact]
    public void Line_status_interrupt_on_overrun()
    {
        Out(MCR, 0x10);
        Out(IER, 0x04);
        Out(THR, 1);
        Out(THR, 2);
        Assert.Equal(0x06, In(IIR));
        In(LSR);
        Assert.NotEqual(0x06, In(IIR));
    }

    [Fact]
    public void Wide_reads_return_the_register_then_all_ones()
    {
        Out(SCR, 0x12);
        var data = new byte[4];
        _uart.Read(SCR, data);
        Assert.Equal(new byte[] { 0x12, 0xFF, 0xFF, 0xFF }, data);
    }

    [Fact]
    public void A_full_console_keeps_THR_busy_until_it_drains_then_raises_THRE()
    {
        _sink.Capacity = 2;
        Out(IER, 0x02);
        In(IIR); // acknowledge the THRE interrupt enabling raised
        Out(THR, (byte)'a');
        Out(THR, (byte)'b');
        Out(THR, (byte)'c');              // refused: THR holds it
        Assert.Equal(0x00, In(LSR) & 0x60); // THR not empty: a polling guest waits
        Assert.False(_irq.Level);
        Assert.Equal("ab", Transmitted());
        _sink.Drain(10);
        Assert.Equal("abc", Transmitted());
        Assert.Equal(0x60, In(LSR) & 0x60);
        Assert.True(_irq.Level);            // THR-empty interrupt for interrupt-driven guests
        Assert.Equal(0x02, In(IIR));
        Assert.Equal(0, _uart.DroppedBytes);
    }

    [Fact]
    public void Writing_THR_while_it_is_still_full_loses_the_byte_and_counts_it()
    {
        _sink.Capacity = 0;
        Out(THR, (byte)'x');
        Out(THR, (byte)'y');
        _sink.Drain(10);
        Assert.Equal("x", Transmitted());
        Assert.Equal(1, _uart.DroppedBytes);
    }

    [Fact]
    public void Input_queued_during_loopback_appears_when_loopback_ends()
    {
        Out(MCR, 0x10);
        _uart.EnqueueInput("q"u8);
        Assert.Equal(0, In(LSR) & 1);     // the receiver is disconnected from the line in loopback
        Out(MCR, 0x00);
        Assert.Equal(1, In(LSR) & 1);
        Assert.Equal((byte)'q', In(RBR));
    }

    [Fact]
    public void Enabling_the_FIFO_lets_it_fill_to_16_bytes_and_disabling_it_returns_to_one()
    {
        _uart.EnqueueInput(Enumerable.Range(0, 40).Select(i => (byte)i).ToArray());
        Out(FCR, 0x01);
        int n = 0;
        Out(MCR, 0x10); // loopback: no refill from the host queue while counting
        while ((In(LSR) & 1) != 0) { In(RBR); n++; }
        Assert.Equal(16, n);
        Out(MCR, 0x00);
        Out(FCR, 0x00); // FIFO off: one-byte holding register
        Out(MCR, 0x10);
        n = 0;
        while ((In(LSR) & 1) != 0) { In(RBR); n++; }
        Assert.Equal(1, n);
    }

    [Fact]
    public void FCR_bits_are_ignored_while_the_FIFO_stays_disabled()
    {
        _uart.EnqueueInput("k"u8);
        Out(FCR, 0x02); // clear-RX without the enable bit: not programmed
        Assert.Equal(1, In(LSR) & 1);
        Assert.Equal(0x01, In(IIR));
    }
}
