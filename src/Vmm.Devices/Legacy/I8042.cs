namespace Vmm.Devices.Legacy;

/// <summary>An i8042 keyboard controller with no keyboard attached: enough for Linux's probe (self-test,
/// command byte, interface tests) and for the reset line (command 0xFE, or output-port bit 0 cleared via
/// 0xD1). Registered at port 0x60 with a length of 5 so that 0x64 is offset 4.</summary>
public sealed class I8042(IVmControl control) : IBusDevice
{
    public const ushort DataPort = 0x60;
    public const ushort CommandPort = 0x64;

    private const byte STATUS_OBF = 0x01, STATUS_SYS = 0x04, STATUS_CMD = 0x08, STATUS_AUX_OBF = 0x20;

    private readonly Lock _lock = new();
    private byte _commandByte = 0x45; // translate, system flag, keyboard interrupt (PC firmware default)
    private byte _status = STATUS_SYS;
    private byte _output;
    private byte _pendingCommand;    // a command that takes a data byte on port 0x60
    private byte _outputPort = 0x03; // bit 0: reset line released, bit 1: A20 enabled

    public void Read(ulong offset, Span<byte> data)
    {
        lock (_lock)
        {
            if (offset == 0)
            {
                data[0] = _output;
                _status = (byte)(_status & ~(STATUS_OBF | STATUS_AUX_OBF));
            }
            else if (offset == 4)
            {
                data[0] = _status;
            }
            else
            {
                data[0] = 0xFF;
            }
        }
        if (data.Length > 1)
            data[1..].Fill(0xFF);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        byte value = data[0];
        bool reset = false;
        lock (_lock)
        {
            if (offset == 4)
                reset = Command(value);
            else if (offset == 0)
                reset = DataWrite(value);
        }
        if (reset)
            control.RequestReset("i8042 reset line");
    }

    private bool Command(byte command)
    {
        _status |= STATUS_CMD;
        _pendingCommand = 0; // a new command cancels one still waiting for its data byte
        switch (command)
        {
            case 0x20: Respond(_commandByte); break;          // read command byte
            case 0x60: case 0xD1: case 0xD2: case 0xD3: case 0xD4:
                _pendingCommand = command; break;             // followed by a data byte
            case 0xA7: _commandByte |= 0x20; break;           // disable aux port
            case 0xA8: _commandByte = (byte)(_commandByte & ~0x20); break;
            case 0xA9: Respond(0x00); break;                  // aux interface test: OK
            case 0xAA: Respond(0x55); break;                  // controller self-test: passed
            case 0xAB: Respond(0x00); break;                  // keyboard interface test: OK
            case 0xAD: _commandByte |= 0x10; break;           // disable keyboard
            case 0xAE: _commandByte = (byte)(_commandByte & ~0x10); break;
            case 0xC0: Respond(0x00); break;                  // read input port
            case 0xD0: Respond(_outputPort); break;           // read output port
            case 0xFE: return true;                           // pulse the reset line
            default:
                // 0xF0-0xFF pulse output-port lines; bit 0 low is the reset line.
                if (command >= 0xF0 && (command & 0x01) == 0)
                    return true;
                break;
        }
        return false;
    }

    private bool DataWrite(byte value)
    {
        _status = (byte)(_status & ~STATUS_CMD);
        byte pending = _pendingCommand;
        _pendingCommand = 0;
        switch (pending)
        {
            case 0x60:
                _commandByte = value;
                _status = (byte)((_status & ~STATUS_SYS) | (value & STATUS_SYS));
                return false;
            case 0xD1:
                _outputPort = value;
                return (value & 0x01) == 0; // reset line asserted
            case 0xD2: Respond(value); return false;  // echo as keyboard data
            case 0xD3: Respond(value, aux: true); return false;
            case 0xD4: return false;                  // to the (absent) mouse: swallowed
            default:
                // A byte for the keyboard itself; there is none, so answer "resend"-free silence.
                return false;
        }
    }

    private void Respond(byte value, bool aux = false)
    {
        _output = value;
        _status |= STATUS_OBF;
        if (aux)
            _status |= STATUS_AUX_OBF;
    }
}
