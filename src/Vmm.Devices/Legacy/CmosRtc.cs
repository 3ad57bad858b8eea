namespace Vmm.Devices.Legacy;

/// <summary>The PC's MC146818 CMOS real-time clock and NVRAM at ports 0x70 (index; bit 7 masks NMI) and
/// 0x71 (data). The clock reads the host's UTC time (plus whatever offset the guest set), in BCD or binary
/// and 12- or 24-hour form as register B selects; NVRAM carries the memory-size bytes firmware leaves
/// there (as QEMU fills them). Update-in-progress is never reported, so readers never wait. Periodic,
/// alarm and update interrupts are not generated (register C reads 0).</summary>
public sealed class CmosRtc : IBusDevice
{
    public const ushort Port = 0x70;

    private const int Seconds = 0x00, Minutes = 0x02, Hours = 0x04, DayOfWeek = 0x06, DayOfMonth = 0x07,
        Month = 0x08, Year = 0x09, RegA = 0x0A, RegB = 0x0B, RegC = 0x0C, RegD = 0x0D, Century = 0x32;
    private const byte RegB24Hour = 0x02, RegBBinary = 0x04, RegBSet = 0x80;

    private readonly Lock _lock = new();
    private readonly byte[] _nvram = new byte[128];
    private readonly Func<DateTime> _clock;
    private TimeSpan _offset;       // guest-set time minus host time
    private byte _index;

    /// <param name="ramBelow4G">Guest RAM below the 32-bit hole, for the memory-size bytes.</param>
    /// <param name="ramAbove4G">Guest RAM from 4 GiB.</param>
    /// <param name="clock">The host clock (UTC); tests pass a fixed one.</param>
    public CmosRtc(ulong ramBelow4G, ulong ramAbove4G, Func<DateTime>? clock = null)
    {
        _clock = clock ?? (() => DateTime.UtcNow);
        _nvram[RegA] = 0x26;               // 32.768 kHz time base, 1024 Hz periodic rate
        _nvram[RegB] = RegB24Hour;         // BCD, 24-hour, no interrupts
        _nvram[RegD] = 0x80;               // valid RAM and time
        // 0x15/0x16 base memory (KiB); 0x17/0x18 and 0x30/0x31 extended memory 1-64 MiB (KiB);
        // 0x34/0x35 memory above 16 MiB (64 KiB units); 0x5b-0x5d memory above 4 GiB (64 KiB units).
        Set16(0x15, 640);
        ulong extKiB = ramBelow4G > 1 << 20 ? Math.Min((ramBelow4G - (1 << 20)) / 1024, 0xFFFF) : 0;
        Set16(0x17, (ushort)extKiB);
        Set16(0x30, (ushort)extKiB);
        ulong above16M = ramBelow4G > 16 << 20 ? Math.Min((ramBelow4G - (16 << 20)) >> 16, 0xFFFF) : 0;
        Set16(0x34, (ushort)above16M);
        ulong high = ramAbove4G >> 16;
        _nvram[0x5B] = (byte)high;
        _nvram[0x5C] = (byte)(high >> 8);
        _nvram[0x5D] = (byte)(high >> 16);
    }

    private void Set16(int at, ushort value)
    {
        _nvram[at] = (byte)value;
        _nvram[at + 1] = (byte)(value >> 8);
    }

    public void Read(ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            data[0] = offset == 0 ? (byte)0xFF : ReadRegister(_index);
        }
        if (data.Length > 1)
            data[1..].Fill(0xFF);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            if (offset == 0)
                _index = (byte)(data[0] & 0x7F); // bit 7 is the NMI mask, not part of the index
            else
                WriteRegister(_index, data[0]);
        }
    }

    private DateTime Now => _clock() + _offset;

    private byte ReadRegister(int reg)
    {
        if (reg > Year && reg != Century)
        {
            byte v = _nvram[reg];
            if (reg == RegC)
                _nvram[RegC] = 0; // flags clear on read
            return v;
        }
        var t = Now;
        return reg switch
        {
            Seconds => Encode(t.Second),
            Minutes => Encode(t.Minute),
            Hours => EncodeHour(t.Hour),
            DayOfWeek => Encode((int)t.DayOfWeek + 1),
            DayOfMonth => Encode(t.Day),
            Month => Encode(t.Month),
            Year => Encode(t.Year % 100),
            Century => Encode(t.Year / 100),
            _ => _nvram[reg], // alarm registers
        };
    }

    private void WriteRegister(int reg, byte value)
    {
        switch (reg)
        {
            case RegC:
            case RegD:
                return; // read-only
            case RegA:
                _nvram[RegA] = (byte)(value & 0x7F); // UIP is read-only
                return;
            case Seconds or Minutes or Hours or DayOfMonth or Month or Year or Century:
                SetTimeField(reg, value);
                return;
            default:
                _nvram[reg] = value;
                return;
        }
    }

    /// <summary>The guest sets the clock one field at a time; the new time becomes an offset from the host's.</summary>
    private void SetTimeField(int reg, byte value)
    {
        var t = Now;
        int v = Decode(value);
        int second = t.Second, minute = t.Minute, hour = t.Hour, day = t.Day, month = t.Month, year = t.Year;
        switch (reg)
        {
            case Seconds: second = v; break;
            case Minutes: minute = v; break;
            case Hours: hour = DecodeHour(value); break;
            case DayOfMonth: day = v; break;
            case Month: month = v; break;
            case Year: year = year / 100 * 100 + v; break;
            case Century: year = v * 100 + year % 100; break;
        }
        try
        {
            day = Math.Min(day, DateTime.DaysInMonth(year, Math.Clamp(month, 1, 12)));
            var set = new DateTime(year, Math.Clamp(month, 1, 12), Math.Max(day, 1), Math.Clamp(hour, 0, 23),
                Math.Clamp(minute, 0, 59), Math.Clamp(second, 0, 59), DateTimeKind.Utc);
            _offset = set - _clock();
        }
        catch (ArgumentOutOfRangeException)
        {
            // A nonsense date from the guest leaves the clock as it was.
        }
    }

    private bool Binary => (_nvram[RegB] & RegBBinary) != 0;

    private byte Encode(int v) => Binary ? (byte)v : (byte)(((v / 10) << 4) | (v % 10));

    private int Decode(byte v) => Binary ? v : ((v >> 4) * 10) + (v & 0x0F);

    private byte EncodeHour(int hour)
    {
        if ((_nvram[RegB] & RegB24Hour) != 0)
            return Encode(hour);
        int h12 = hour % 12 == 0 ? 12 : hour % 12;
        return (byte)(Encode(h12) | (hour >= 12 ? 0x80 : 0)); // bit 7: PM
    }

    private int DecodeHour(byte value)
    {
        if ((_nvram[RegB] & RegB24Hour) != 0)
            return Decode(value);
        int h = Decode((byte)(value & 0x7F)) % 12;
        return (value & 0x80) != 0 ? h + 12 : h;
    }
}
