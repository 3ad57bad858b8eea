using SharpFuzz;
using Vmm.Fuzz;

// vmm's fuzz driver. Under afl-fuzz (tools/fuzz/run.sh): `Vmm.Fuzz TARGET` runs SharpFuzz's fork server, feeding
// each input to the target in this one process. By hand: `Vmm.Fuzz TARGET FILE...` runs the files once each (a
// crash reproduces with its stack trace), `Vmm.Fuzz --list` lists the targets, `Vmm.Fuzz --write-seeds DIR`
// writes the generated part of the seed corpus.
// Instrumented code (the vmm assemblies run.sh rewrote) writes every branch into SharpFuzz's trace map, which
// Fuzzer.Run points at afl-fuzz's shared memory. Until then — the target's set-up, or a reproduction run outside
// afl-fuzz — it needs a map too: a private one, never read.
unsafe
{
    if (SharpFuzz.Common.Trace.SharedMem == null)
        SharpFuzz.Common.Trace.SharedMem = (byte*)System.Runtime.InteropServices.NativeMemory.AllocZeroed(1 << 16);
}
if (args.Length == 0 || args[0] is "-h" or "--help")
{
    Console.Error.WriteLine("usage: Vmm.Fuzz TARGET [FILE...] | --list | --write-seeds DIR");
    return 2;
}
if (args[0] == "--list")
{
    foreach (var t in FuzzTargets.All)
        Console.WriteLine($"{t.Name,-18} {t.Description}");
    return 0;
}
if (args[0] == "--write-seeds")
{
    Seeds.Write(args[1]);
    return 0;
}
FuzzTargets.Entry entry;
try
{
    entry = FuzzTargets.Find(args[0]);
}
catch (ArgumentException e)
{
    Console.Error.WriteLine(e.Message);
    return 2;
}
using var target = entry.Create();
if (args.Length > 1)
{
    foreach (var file in args.Skip(1))
    {
        target.Run(File.ReadAllBytes(file));
        Console.WriteLine($"{entry.Name}: {file}: ok");
    }
    return 0;
}
// The input buffer is reused: a copy per execution would only feed the GC.
var buffer = new byte[1 << 20];
Fuzzer.Run(stream =>
{
    int n = 0, got;
    while (n < buffer.Length && (got = stream.Read(buffer, n, buffer.Length - n)) > 0)
        n += got;
    target.Run(buffer.AsSpan(0, n));
});
return 0;
