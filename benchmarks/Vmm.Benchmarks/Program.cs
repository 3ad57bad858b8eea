using BenchmarkDotNet.Running;

namespace Vmm.Benchmarks;

/// <summary>
/// <c>dotnet run -c Release --project benchmarks/Vmm.Benchmarks -- [BenchmarkDotNet options]</c> runs the
/// micro-benchmarks (e.g. <c>--filter '*' --job short</c>); two extra commands:
/// <c>make-guests DIR</c> writes the e2e micro-guests (pio-loop.bin, mmio-loop.bin, hello.bin) and
/// <c>thread-alloc</c> prints per-thread allocations of the exit-dispatch cases.
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "make-guests")
        {
            if (args.Length != 2)
            {
                Console.Error.WriteLine("usage: Vmm.Benchmarks make-guests DIR");
                return 2;
            }
            foreach (string path in GuestImages.WriteAll(args[1]))
                Console.WriteLine(path);
            return 0;
        }
        if (args.Length == 1 && args[0] == "thread-alloc")
            return ThreadAllocationCheck.Run();
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }
}
