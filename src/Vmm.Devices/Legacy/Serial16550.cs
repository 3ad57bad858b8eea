namespace Vmm.Devices.Legacy;

/// <summary>A National Semiconductor 16550A UART (register set of the PC16550D datasheet): divisor latch,
/// IER, IIR with interrupt priorities, FCR and 16-byte FIFOs with trigger levels, LCR, MCR with loopback,
/// LSR, MSR and the scratch register. Transmitted bytes go to an <see cref="IByteSink"/> at once (the line
/// is infinitely fast); when the sink is full THR stays busy (LSR.THRE clear) until it drains, so a guest
/// that waits for THRE is slowed to the host's pace and loses nothing. Received bytes come from
/// <see cref="EnqueueInput"/>, held in a host-side queue that refills the 16-byte FIFO as the guest drains it,
/// so pasted input is never lost.</summary>
public sealed class Serial16550 : IBusDevice, IConsoleInput
{
    // Register offsets.
    private const int RBR_THR_DLL = 0, IER_DLM = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7;

    // IER bits.
    private const byte IER_RDA = 0x01, IER_THRE = 0x02, IER_RLS = 0x04, IER_MS = 0x08;

    // IIR values (bit 0 clear means "interrupt pending"), highest priority first.
    private const byte IIR_NONE = 0x01, IIR_RLS = 0x06, IIR_RDA = 0x04, IIR_TIMEOUT = 0x0C, IIR_THRE = 0x02, IIR_MS = 0x00;
    private const byte IIR_FIFO_ENABLED = 0xC0;

    // FCR bits.
    private const byte FCR_ENABLE = 0x01, FCR_CLEAR_RX = 0x02, FCR_CLEAR_TX = 0x04;

    private const byte LCR_DLAB = 0x80;

    // MCR bits.
    private const byte MCR_DTR = 0x01, MCR_RTS = 0x02, MCR_OUT1 = 0x04, MCR_OUT2 = 0x08, MCR_LOOP = 0x10;

    // LSR bits.
    private const byte LSR_DR = 0x01, LSR_OE = 0x02, LSR_BI = 0x10, LSR_THRE = 0x20, LSR_TEMT = 0x40, LSR_ERRORS = 0x1E;

    // MSR bits.
    private const byte MSR_DCTS = 0x01, MSR_DDSR = 0x02, MSR_TERI = 0x04, MSR_DDCD = 0x08;
    private const byte MSR_CTS = 0x10, MSR_DSR = 0x20, MSR_RI = 0x40, MSR_DCD = 0x80;

    public const int FifoSize = 16;
    public const int InputQueueCapacity = 4096;

    private readonly Lock _lock = new();
    private readonly IInterruptLine _irq;
    private readonly IByteSink? _output;
    private bool _thrHolding;   // THR holds a byte the sink refused
    private byte _thr;

    private readonly byte[] _rxFifo = new byte[FifoSize];
    private int _rxHead, _rxCount;
    private readonly byte[] _inputQueue = new byte[InputQueueCapacity];
    private int _inputHead, _inputCount;

    private byte _ier, _lcr = 0x03, _mcr = MCR_OUT2, _lsr = LSR_THRE | LSR_TEMT, _msr = MSR_DCD | MSR_DSR | MSR_CTS, _scr;
    private byte _fcr;
    private ushort _divisor = 12; // 9600 baud, the reset value firmware leaves
    private bool _thrEmptyInterrupt; // "THR empty" is a pending source until IIR is read or THR written
    private bool _irqLevel;
    private long _bytesTransmitted;
    private long _droppedBytes;

    /// <param name="irq">The UART's interrupt line (IRQ 4 for COM1).</param>
    /// <param name="output">Where transmitted bytes go; null discards them.</param>
    public Serial16550(IInterruptLine irq, IByteSink? output)
    {
        _irq = irq;
        _output = output;
        output?.AddSpaceAvailableCallback(OnOutputSpaceAvailable);
    }

    /// <summary>The sink drained: send the held THR byte and report THR empty (with its interrupt).</summary>
    private void OnOutputSpaceAvailable()
    {
        lock (_lock)
        {
            if (!_thrHolding || !_output!.TryWrite(_thr))
                return;
            _thrHolding = false;
            _bytesTransmitted++;
            _lsr |= LSR_THRE | LSR_TEMT;
            _thrEmptyInterrupt = true;
            UpdateInterrupt();
        }
    }

    public long BytesTransmitted
    {
        get { lock (_lock) return _bytesTransmitted; }
    }

    /// <summary>Bytes the guest wrote to THR while it was still full (it did not wait for THRE).</summary>
    public long DroppedBytes
    {
        get { lock (_lock) return _droppedBytes; }
    }

    /// <summary>Space left in the host-side input queue.</summary>
    public int InputSpace
    {
        get { lock (_lock) return InputQueueCapacity - _inputCount; }
    }

    /// <summary>Queues received bytes (from stdin, a socket, a test). Returns how many were taken; the caller
    /// retries the rest later (flow control instead of overrun).</summary>
    public int EnqueueInput(ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            int n = Math.Min(data.Length, InputQueueCapacity - _inputCount);
            for (int i = 0; i < n; i++)
                _inputQueue[(_inputHead + _inputCount + i) % InputQueueCapacity] = data[i];
            _inputCount += n;
            RefillRxFifo();
            UpdateInterrupt();
            return n;
        }
    }

    public void Read(ulong offset, Span<byte> data)
    {
        byte value;
        lock (_lock)
        {
            value = ReadRegister((int)(offset & 7));
            UpdateInterrupt();
        }
        data[0] = value;
        // Wider accesses to a byte-wide UART read the neighbours as all-ones, as an ISA bus does.
        if (data.Length > 1)
            data[1..].Fill(0xFF);
    }

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        lock (_lock)
        {
            WriteRegister((int)(offset & 7), data[0]);
            UpdateInterrupt();
        }
    }

    private bool Dlab => (_lcr & LCR_DLAB) != 0;
    private bool FifoEnabled => (_fcr & FCR_ENABLE) != 0;
    private bool Loopback => (_mcr & MCR_LOOP) != 0;

    private int RxTriggerLevel => (_fcr >> 6) switch { 0 => 1, 1 => 4, 2 => 8, _ => 14 };

    private byte ReadRegister(int reg)
    {
        switch (reg)
        {
            case RBR_THR_DLL:
                if (Dlab)
                    return (byte)_divisor;
                return PopRx();
            case IER_DLM:
                return Dlab ? (byte)(_divisor >> 8) : _ier;
            case IIR_FCR:
            {
                byte iir = ComputeIir();
                // Reading IIR while it reports "THR empty" acknowledges that source (datasheet table 4).
                if (iir == IIR_THRE)
                    _thrEmptyInterrupt = false;
                return (byte)(iir | (FifoEnabled ? IIR_FIFO_ENABLED : 0));
            }
            case LCR:
                return _lcr;
            case MCR:
                return _mcr;
            case LSR:
            {
                byte lsr = _lsr;
                _lsr = (byte)(_lsr & ~LSR_ERRORS); // error bits clear on read
                return lsr;
            }
            case MSR:
            {
                byte msr = ModemStatus();
                _msr = (byte)(_msr & 0xF0); // delta bits clear on read
                return msr;
            }
            default:
                return _scr;
        }
    }

    private void WriteRegister(int reg, byte value)
    {
        switch (reg)
        {
            case RBR_THR_DLL:
                if (Dlab)
                {
                    _divisor = (ushort)((_divisor & 0xFF00) | value);
                    return;
                }
                Transmit(value);
                return;
            case IER_DLM:
                if (Dlab)
                {
                    _divisor = (ushort)((_divisor & 0x00FF) | (value << 8));
                    return;
                }
                // Enabling the THRE interrupt while THR is empty raises it at once (as real 16550As and
                // QEMU do; Linux's 8250 driver probes for exactly this).
                if ((value & IER_THRE) != 0 && (_ier & IER_THRE) == 0 && (_lsr & LSR_THRE) != 0)
                    _thrEmptyInterrupt = true;
                _ier = (byte)(value & 0x0F);
                return;
            case IIR_FCR:
            {
                // With bit 0 clear the other bits are not programmed (datasheet, FCR); switching the FIFOs
                // on or off, or the clear bit, empties the receiver. The new mode applies before refilling.
                bool modeChange = (value & FCR_ENABLE) != (_fcr & FCR_ENABLE);
                bool clearRx = modeChange || ((value & FCR_ENABLE) != 0 && (value & FCR_CLEAR_RX) != 0);
                _fcr = (value & FCR_ENABLE) != 0 ? (byte)(value & 0xC9) : (byte)0;
                if (clearRx)
                {
                    _rxHead = _rxCount = 0;
                    _lsr = (byte)(_lsr & ~LSR_DR);
                    RefillRxFifo();
                }
                return;
            }
            case LCR:
                _lcr = value;
                return;
            case MCR:
            {
                byte before = ModemStatus();
                bool wasLoopback = Loopback;
                _mcr = (byte)(value & 0x1F);
                byte after = ModemStatus();
                if (wasLoopback && !Loopback)
                    RefillRxFifo(); // host input that arrived during loopback becomes visible now
                // Modem-status deltas (loopback makes MCR outputs visible as MSR inputs).
                byte delta = 0;
                if (((before ^ after) & MSR_CTS) != 0) delta |= MSR_DCTS;
                if (((before ^ after) & MSR_DSR) != 0) delta |= MSR_DDSR;
                if ((before & MSR_RI) != 0 && (after & MSR_RI) == 0) delta |= MSR_TERI;
                if (((before ^ after) & MSR_DCD) != 0) delta |= MSR_DDCD;
                _msr |= delta;
                return;
            }
            case LSR:
            case MSR:
                return; // read-only (factory test registers)
            default:
                _scr = value;
                return;
        }
    }

    private byte ModemStatus()
    {
        if (!Loopback)
            return _msr; // a connected line: carrier, data set ready, clear to send
        byte msr = (byte)(_msr & 0x0F);
        if ((_mcr & MCR_RTS) != 0) msr |= MSR_CTS;
        if ((_mcr & MCR_DTR) != 0) msr |= MSR_DSR;
        if ((_mcr & MCR_OUT1) != 0) msr |= MSR_RI;
        if ((_mcr & MCR_OUT2) != 0) msr |= MSR_DCD;
        return msr;
    }

    private void Transmit(byte value)
    {
        if (_thrHolding)
        {
            // Writing THR while it is still full: the byte is lost, as on hardware (the guest ignored THRE).
            _droppedBytes++;
            return;
        }
        _thrEmptyInterrupt = false;
        if (Loopback)
        {
            PushRx(value);
        }
        else if (_output is not null && !_output.TryWrite(value))
        {
            _thr = value;
            _thrHolding = true;
            _lsr = (byte)(_lsr & ~(LSR_THRE | LSR_TEMT));
            return;
        }
        _bytesTransmitted++;
        _lsr |= LSR_THRE | LSR_TEMT;
        _thrEmptyInterrupt = true;
    }

    private void PushRx(byte value)
    {
        int capacity = FifoEnabled ? FifoSize : 1;
        if (_rxCount >= capacity)
        {
            _lsr |= LSR_OE; // overrun: the new byte is lost, as on hardware
            return;
        }
        _rxFifo[(_rxHead + _rxCount) % FifoSize] = value;
        _rxCount++;
        _lsr |= LSR_DR;
    }

    private byte PopRx()
    {
        if (_rxCount == 0)
            return 0;
        byte value = _rxFifo[_rxHead];
        _rxHead = (_rxHead + 1) % FifoSize;
        _rxCount--;
        RefillRxFifo();
        if (_rxCount == 0)
            _lsr = (byte)(_lsr & ~LSR_DR);
        return value;
    }

    private void RefillRxFifo()
    {
        if (Loopback)
            return; // in loopback the receiver is disconnected from the line
        int capacity = FifoEnabled ? FifoSize : 1;
        while (_inputCount > 0 && _rxCount < capacity)
        {
            _rxFifo[(_rxHead + _rxCount) % FifoSize] = _inputQueue[_inputHead];
            _rxCount++;
            _inputHead = (_inputHead + 1) % InputQueueCapacity;
            _inputCount--;
            _lsr |= LSR_DR;
        }
    }

    private byte ComputeIir()
    {
        if ((_ier & IER_RLS) != 0 && (_lsr & (LSR_OE | LSR_ERRORS)) != 0)
            return IIR_RLS;
        if ((_ier & IER_RDA) != 0 && _rxCount > 0)
        {
            // Below the trigger level the FIFO reports a character timeout; we do not model the four
            // character times of waiting, the data is reported at once.
            if (!FifoEnabled || _rxCount >= RxTriggerLevel)
                return IIR_RDA;
            return IIR_TIMEOUT;
        }
        if ((_ier & IER_THRE) != 0 && _thrEmptyInterrupt)
            return IIR_THRE;
        if ((_ier & IER_MS) != 0 && (_msr & 0x0F) != 0)
            return IIR_MS;
        return IIR_NONE;
    }

    private void UpdateInterrupt()
    {
        // Like QEMU, OUT2 does not gate the line: firmware-less guests often leave it clear.
        bool level = ComputeIir() != IIR_NONE;
        if (level != _irqLevel)
        {
            _irqLevel = level;
            _irq.SetLevel(level);
        }
    }
}
