using BenchmarkDotNet.Running;

namespace Vmm.Benchmarks;

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
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }
}
