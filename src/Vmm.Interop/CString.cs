using System.Text;

namespace Vmm.Interop;

/// <summary>Paths and names for system calls: UTF-8 with the terminating NUL.</summary>
internal static class CString
{
    public static byte[] From(string s)
    {
        var bytes = new byte[Encoding.UTF8.GetByteCount(s) + 1];
        Encoding.UTF8.GetBytes(s, bytes);
        return bytes;
    }
}
