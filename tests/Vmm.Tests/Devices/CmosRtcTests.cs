using Vmm.Devices.Legacy;

namespace Vmm.Tests.Devices;

public class CmosRtcTests
{
    private static readonly DateTime s_now = new(2026, 11, 25, 15, 4, 9, DateTimeKind.Utc);
    private DateTime _clock = s_now;

    private CmosRtc Rtc(ulong below = 128UL << 20, ulong above = 0) => new(below, above, () => _clock);

    private static byte Get(CmosRtc rtc, byte index)
    {
        rtc.Write(0, [index]);
        var b = new byte[1];
        rtc.Read(1, b);
        return b[0];
    }

    private static void Set(CmosRtc rtc, byte index, byte value)
    {
        rtc.Write(0, [index]);
        rtc.Write(1, [value]);
    }

    [Fact]
    public void Reads_the_host_time_in_BCD_24_hour_by_default()
    {
        var rtc = Rtc();
        Assert.Equal(new byte[] { 0x09, 0x04, 0x15, 0x25, 0x11, 0x26, 0x20, 0x04 },
            new[] { Get(rtc, 0), Get(rtc, 2), Get(rtc, 4), Get(rtc, 7), Get(rtc, 8), Get(rtc, 9), Get(rtc, 0x32), Get(rtc, 6) });
        Assert.Equal(0x26, Get(rtc, 0x0A));      // no update in progress
        Assert.Equal(0x80, Get(rtc, 0x0D));      // valid RAM and time
    }

    [Fact]
    public void Binary_and_12_hour_modes_follow_register_B()
    {
        var rtc = Rtc();
        Set(rtc, 0x0B, 0x04); // binary, 12-hour
        Assert.Equal(9, Get(rtc, 0));
        Assert.Equal(0x80 | 3, Get(rtc, 4)); // 15:xx is 3 PM
    }

    [Fact]
    public void NMI_mask_bit_is_not_part_of_the_index()
    {
        var rtc = Rtc();
        Assert.Equal(Get(rtc, 0x09), Get(rtc, 0x89));
    }

    [Fact]
    public void Guest_set_time_keeps_running_from_the_host_clock()
    {
        var rtc = Rtc();
        Set(rtc, 0x09, 0x30); // year 2030
        Set(rtc, 0x04, 0x08); // 08 o'clock
        _clock = _clock.AddSeconds(61);
        Assert.Equal(0x30, Get(rtc, 0x09));
        Assert.Equal(0x08, Get(rtc, 0x04));
        Assert.Equal(0x05, Get(rtc, 0x02)); // a minute later
    }

    [Fact]
    public void Memory_size_bytes_describe_guest_RAM_as_firmware_leaves_them()
    {
        var rtc = Rtc(3UL << 30, 2UL << 30);
        Assert.Equal(640, Get(rtc, 0x15) | Get(rtc, 0x16) << 8);
        Assert.Equal(0xFFFF, Get(rtc, 0x17) | Get(rtc, 0x18) << 8);                 // capped at 64 MiB
        Assert.Equal((int)(((3L << 30) - (16L << 20)) >> 16), Get(rtc, 0x34) | Get(rtc, 0x35) << 8);
        Assert.Equal((int)((2L << 30) >> 16), Get(rtc, 0x5B) | Get(rtc, 0x5C) << 8 | Get(rtc, 0x5D) << 16);
    }

    [Fact]
    public void NVRAM_bytes_round_trip_and_status_registers_are_read_only()
    {
        var rtc = Rtc();
        Set(rtc, 0x40, 0x5A);
        Assert.Equal(0x5A, Get(rtc, 0x40));
        Set(rtc, 0x0D, 0x00);
        Assert.Equal(0x80, Get(rtc, 0x0D));
    }
}
