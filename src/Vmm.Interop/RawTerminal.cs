using Tmds.Linux;

namespace Vmm.Interop;

/// <summary>Puts a terminal into raw mode (no line editing, no echo, no signal keys) so every key reaches the
/// guest, as QEMU's stdio console does; output post-processing stays on so a guest's "\n" still starts a new
/// line. Dispose restores the saved settings.</summary>
public sealed unsafe class RawTerminal : IDisposable
{
    // <asm-generic/termbits.h>
    private const uint IGNBRK = 0x1, BRKINT = 0x2, PARMRK = 0x8, ISTRIP = 0x20, INLCR = 0x40, IGNCR = 0x80, ICRNL = 0x100, IXON = 0x400;
    private const uint ISIG = 0x1, ICANON = 0x2, ECHO = 0x8, ECHONL = 0x40, IEXTEN = 0x8000;
    private const uint CSIZE = 0x30, PARENB = 0x100, CS8 = 0x30;
    private const int VTIME = 5, VMIN = 6, TCSANOW = 0;

    private readonly int _fd;
    private readonly termios _saved;
    private int _restored;

    private RawTerminal(int fd, termios saved)
    {
        _fd = fd;
        _saved = saved;
    }

    /// <summary>Raw mode on <paramref name="fd"/>, or null when it is not a terminal.</summary>
    public static RawTerminal? TryEnter(int fd)
    {
        termios t;
        if (LibC.tcgetattr(fd, &t) != 0)
            return null;
        var saved = t;
        t.c_iflag &= ~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
        t.c_lflag &= ~(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
        t.c_cflag = (t.c_cflag & ~(CSIZE | PARENB)) | CS8;
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        if (LibC.tcsetattr(fd, TCSANOW, &t) != 0)
            return null;
        return new RawTerminal(fd, saved);
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _restored, 1) != 0)
            return;
        var saved = _saved;
        LibC.tcsetattr(_fd, TCSANOW, &saved);
    }
}
