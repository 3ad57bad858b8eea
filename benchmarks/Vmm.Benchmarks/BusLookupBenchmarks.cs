using BenchmarkDotNet.Attributes;
using Vmm.Devices;

namespace Vmm.Benchmarks;

/// <summary><see cref="Bus.Resolve"/> (binary search over the sorted device table) with 8 and 64 devices.
/// Each operation is one lookup; an invocation does <see cref="Lookups"/> of them over addresses spread across
/// all devices (hits) or between them (misses), so the branch predictor cannot learn a single path.</summary>
[MemoryDiagnoser]
public class BusLookupBenchmarks
{
    private const int Lookups = 256;
    private const ulong Stride = 0x1000, DeviceSize = 0x100;

    [Params(8, 64)]
    public int Devices { get; set; }

    private Bus _bus = null!;
    private readonly ulong[] _hits = new ulong[Lookups];
    private readonly ulong[] _misses = new ulong[Lookups];

    [GlobalSetup]
    public void Setup()
    {
        _bus = new Bus("bench");
        for (int i = 0; i < Devices; i++)
            _bus.Insert(new ScratchRegisters(), 0xFE00_0000 + (ulong)i * Stride, DeviceSize);
        var rng = new Random(42);
        for (int i = 0; i < Lookups; i++)
        {
            ulong device = 0xFE00_0000 + (ulong)rng.Next(Devices) * Stride;
            _hits[i] = device + (ulong)rng.Next((int)DeviceSize);
            _misses[i] = device + DeviceSize + (ulong)rng.Next((int)(Stride - DeviceSize)); // the gap after it
        }
    }

    [Benchmark(OperationsPerInvoke = Lookups)]
    public ulong ResolveHit()
    {
        ulong sum = 0;
        foreach (ulong address in _hits)
        {
            if (_bus.Resolve(address, out ulong offset) is not null)
                sum += offset;
        }
        return sum;
    }

    [Benchmark(OperationsPerInvoke = Lookups)]
    public ulong ResolveMiss()
    {
        ulong sum = 0;
        foreach (ulong address in _misses)
        {
            if (_bus.Resolve(address, out ulong offset) is null)
                sum++;
        }
        return sum;
    }
}
