using Vmm.Devices.Legacy;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices;

public class LegacyDeviceTests
{
    [Fact]
    public void Debug_exit_reports_the_written_32_bit_value()
    {
        var control = new RecordingVmControl();
        var dev = new DebugExit(control);
        dev.Write(0, BitConverter.GetBytes(0x12345678u));
        Assert.Equal(0x12345678u, control.DebugExitValue);
    }

    [Fact]
    public void Debug_exit_zero_extends_a_byte_write()
    {
        var control = new RecordingVmControl();
        new DebugExit(control).Write(0, [0x07]);
        Assert.Equal(7u, control.DebugExitValue);
    }

    [Fact]
    public void I8042_passes_the_Linux_probe_sequence()
    {
        var control = new RecordingVmControl();
        var kbc = new I8042(control);
        byte Read(ulong port) { var b = new byte[1]; kbc.Read(port, b); return b[0]; }
        kbc.Write(4, [0xAA]);               // self-test
        Assert.Equal(0x01, Read(4) & 0x01); // output buffer full
        Assert.Equal(0x55, Read(0));
        Assert.Equal(0x00, Read(4) & 0x01);
        kbc.Write(4, [0x20]);               // read command byte
        byte ctr = Read(0);
        kbc.Write(4, [0x60]);
        kbc.Write(0, [(byte)(ctr & ~0x03)]); // write command byte (interrupts off)
        kbc.Write(4, [0x20]);
        Assert.Equal(ctr & ~0x03, Read(0));
        kbc.Write(4, [0xAB]);               // keyboard interface test
        Assert.Equal(0x00, Read(0));
        Assert.Empty(control.Events);
    }

    [Fact]
    public void I8042_command_FE_pulses_the_reset_line()
    {
        var control = new RecordingVmControl();
        new I8042(control).Write(4, [0xFE]);
        Assert.Equal(["reset: i8042 reset line"], control.Events);
    }

    [Fact]
    public void I8042_output_port_write_with_bit0_clear_resets()
    {
        var control = new RecordingVmControl();
        var kbc = new I8042(control);
        kbc.Write(4, [0xD1]);
        kbc.Write(0, [0x03]); // reset released: nothing
        Assert.Empty(control.Events);
        kbc.Write(4, [0xD1]);
        kbc.Write(0, [0x02]);
        Assert.Single(control.Events);
    }

    [Fact]
    public void Post_code_port_keeps_the_last_code()
    {
        var post = new PostCodeSink();
        post.Write(0, [0x12]);
        post.Write(0, [0x34]);
        Assert.Equal(0x34, post.LastCode);
        Assert.Equal(2, post.Writes);
    }

    [Theory]
    [InlineData(0UL)]
    [InlineData(1UL)]
    [InlineData(3UL)]
    public void Debug_exit_ignores_the_port_offset_like_QEMU(ulong offset)
    {
        var control = new RecordingVmControl();
        new DebugExit(control).Write(offset, BitConverter.GetBytes(5u)); // a 4-byte write at 0xf7 must not throw
        Assert.Equal(5u, control.DebugExitValue);
    }

    [Fact]
    public void I8042_a_new_command_cancels_one_waiting_for_its_data_byte()
    {
        var control = new RecordingVmControl();
        var kbc = new I8042(control);
        kbc.Write(4, [0xD1]); // write output port: expects a data byte...
        kbc.Write(4, [0xAA]); // ...but a self-test comes first
        kbc.Write(0, [0xF4]); // a keyboard byte with bit 0 clear: must not reset
        Assert.Empty(control.Events);
    }
}
