using System.Globalization;
using System.Runtime.InteropServices;
using Vmm.Interop;
using Vmm.TestGpu;

// vfio-user-gpu --socket PATH [--bar2-size 8G] [--report FILE]  (docs/test-gpu.md)
string? socketPath = null, reportPath = null;
ulong bar2Size = 8UL << 30;
for (int i = 0; i < args.Length; i++)
{
    string? value = i + 1 < args.Length ? args[i + 1] : null;
    switch (args[i])
    {
        case "--socket" when value is not null:
            socketPath = value;
            i++;
            break;
        case "--report" when value is not null:
            reportPath = value;
            i++;
            break;
        case "--bar2-size" when value is not null:
            if (!TryParseSize(value, out bar2Size) || bar2Size < (4UL << 30) || (bar2Size & (bar2Size - 1)) != 0 || bar2Size > (1UL << 46))
                return Usage($"--bar2-size {value}: must be a power of two from 4G to 64T");
            i++;
            break;
        default:
            return Usage($"unknown or incomplete argument '{args[i]}'");
    }
}
if (socketPath is null)
    return Usage("--socket PATH is required");

GpuServer? server = null;
var reportLock = new object();
bool reported = false;
void Report()
{
    lock (reportLock)
    {
        if (reported || reportPath is null || server is null)
            return;
        reported = true;
        var gpu = server.Gpu;
        File.WriteAllText(reportPath,
            $"dma_ops={gpu.TotalDmaOps}\nirqs={gpu.TotalIrqs}\nbar2_fnv={gpu.Bar2Fnv():x16}\nbar0_sram_fnv={gpu.SramFnv():x16}\n" +
            $"errors={server.Errors + gpu.DmaErrors}\n");
    }
}

try
{
    UnixSocket client;
    using (var listener = UnixSocket.Listen(socketPath))
    {
        Console.WriteLine($"vfio-user-gpu: listening on {socketPath}");
        client = listener.Accept();
    }
    File.Delete(socketPath); // one client only: nobody else may connect
    server = new GpuServer(client, bar2Size);
    // Killed with SIGTERM (vmm's scenario ends): still write the report.
    using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, _ => Report());
    bool clean = server.Run();
    Report();
    server.Dispose();
    return clean ? 0 : 1;
}
catch (Exception e) when (e is SyscallException or IOException or UnauthorizedAccessException or ArgumentException)
{
    Console.Error.WriteLine($"vfio-user-gpu: {e.Message}");
    Report();
    return 1;
}

static int Usage(string error)
{
    Console.Error.WriteLine($"vfio-user-gpu: {error}\nusage: vfio-user-gpu --socket PATH [--bar2-size 8G] [--report FILE]");
    return 2;
}

static bool TryParseSize(string text, out ulong bytes)
{
    bytes = 0;
    ulong unit = 1;
    char last = text.Length > 0 ? char.ToUpperInvariant(text[^1]) : ' ';
    int shift = last switch { 'K' => 10, 'M' => 20, 'G' => 30, 'T' => 40, _ => 0 };
    if (shift > 0)
    {
        unit <<= shift;
        text = text[..^1];
    }
    if (!ulong.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out ulong n) || n > ulong.MaxValue / unit)
        return false;
    bytes = n * unit;
    return true;
}
