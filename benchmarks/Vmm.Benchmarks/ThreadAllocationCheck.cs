using System.Diagnostics;
using Vmm.Machine;

namespace Vmm.Benchmarks;

/// <summary><c>thread-alloc</c> command: BenchmarkDotNet's MemoryDiagnoser counts the allocations of every
/// thread, but the vCPU loop's zero-allocation rule is about the dispatching thread
/// (<c>GC.GetAllocatedBytesForCurrentThread</c>, as <c>vmm --stats</c> reports it as exit_allocated_bytes).
/// This runs each <see cref="ExitDispatchBenchmarks"/> case a million times and prints both.</summary>
public static class ThreadAllocationCheck
{
    public static int Run()
    {
        var bench = new ExitDispatchBenchmarks();
        bench.Setup();
        try
        {
            var cases = new (string Name, Func<ExitAction> Op)[]
            {
                (nameof(bench.PioOutPostCode), bench.PioOutPostCode),
                (nameof(bench.PioInUartLsr), bench.PioInUartLsr),
                (nameof(bench.PioOutUartThr), bench.PioOutUartThr),
                (nameof(bench.PioOutUartThrNoConsole), bench.PioOutUartThrNoConsole),
                (nameof(bench.MmioWriteUnclaimed), bench.MmioWriteUnclaimed),
                (nameof(bench.MmioWriteClaimed), bench.MmioWriteClaimed),
                (nameof(bench.MmioReadClaimed), bench.MmioReadClaimed),
            };
            const int warmup = 200_000, n = 1_000_000;
            Console.WriteLine($"{"case",-24} {"ns/op",8} {"this-thread B/op",17} {"all-threads B/op",17}");
            foreach (var (name, op) in cases)
            {
                for (int i = 0; i < warmup; i++)
                    op();
                long all0 = GC.GetTotalAllocatedBytes(precise: true);
                long mine0 = GC.GetAllocatedBytesForCurrentThread();
                long t0 = Stopwatch.GetTimestamp();
                for (int i = 0; i < n; i++)
                    op();
                double ns = Stopwatch.GetElapsedTime(t0).TotalNanoseconds / n;
                long mine = GC.GetAllocatedBytesForCurrentThread() - mine0;
                long all = GC.GetTotalAllocatedBytes(precise: true) - all0;
                Console.WriteLine($"{name,-24} {ns,8:F1} {(double)mine / n,17:F3} {(double)all / n,17:F3}");
            }
        }
        finally
        {
            bench.Cleanup();
        }
        return 0;
    }
}
