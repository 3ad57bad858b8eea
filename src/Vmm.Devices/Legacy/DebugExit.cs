using System.Buffers.Binary;

namespace Vmm.Devices.Legacy;

/// <summary>QEMU's isa-debug-exit (port 0xF4, 4 bytes wide): writing v ends the VM and vmm exits with
/// status (v &lt;&lt; 1) | 1, so test guests report their result the same way under QEMU and vmm.</summary>
public sealed class DebugExit(IVmControl control) : IBusDevice
{
    public const ushort DefaultPort = 0xF4;
    public const int Width = 4;

    public void Read(ulong offset, Span<byte> data) => data.Fill(0xFF);

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        // Any width at any of the four ports counts, zero-extended: QEMU ignores the offset too.
        Span<byte> value = stackalloc byte[4];
        value.Clear();
        data[..Math.Min(data.Length, 4)].CopyTo(value);
        control.RequestDebugExit(BinaryPrimitives.ReadUInt32LittleEndian(value));
    }
}

/// <summary>The POST-code port 0x80: firmware and Linux write progress codes and use it as an I/O delay.
/// Writes are kept as the last code; reads return it.</summary>
public sealed class PostCodeSink : IBusDevice
{
    public const ushort DefaultPort = 0x80;

    private int _last;
    private long _writes;

    public byte LastCode => (byte)Volatile.Read(ref _last);

    public long Writes => Interlocked.Read(ref _writes);

    public void Read(ulong offset, Span<byte> data) => data.Fill((byte)Volatile.Read(ref _last));

    public void Write(ulong offset, ReadOnlySpan<byte> data)
    {
        Volatile.Write(ref _last, data[0]);
        Interlocked.Increment(ref _writes);
    }
}
