using Vmm.Fuzz;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Fuzz;

/// <summary>The fuzz targets of tools/fuzz in-process, in every test run: each committed corpus file and each
/// regression input (an input that once broke an invariant, kept after the fix) goes through its target, whose
/// invariants throw <see cref="FuzzInvariantException"/> — or an exception the component does not document — on a
/// finding. Then a short deterministic mutation pass over the same seeds, so a broken invariant near a seed shows up
/// without afl-fuzz. The real fuzzing (afl-fuzz on SharpFuzz-instrumented assemblies) is test.sh's last step.</summary>
public sealed class FuzzCorpusReplayTests
{
    private static readonly string s_corpus = Repo.PathTo("tools", "fuzz", "corpus");
    private static readonly string s_regressions = Repo.PathTo("tools", "fuzz", "regressions");

    public static TheoryData<string> Targets() => [.. FuzzTargets.All.Select(t => t.Name)];

    private static string[] Inputs(string target) =>
        [.. new[] { s_corpus, s_regressions }
            .Select(d => Path.Combine(d, target))
            .Where(Directory.Exists)
            .SelectMany(Directory.GetFiles)
            .Order(StringComparer.Ordinal)];

    [Theory]
    [MemberData(nameof(Targets))]
    public void Every_corpus_and_regression_input_keeps_the_invariants(string target)
    {
        var inputs = Inputs(target);
        Assert.True(inputs.Length >= 2, $"{target}: {inputs.Length} seed(s) in tools/fuzz/corpus/{target}; every target needs a few, valid ones included");
        using var t = FuzzTargets.Find(target).Create();
        var failures = new List<string>();
        foreach (var file in inputs)
        {
            try
            {
                t.Run(File.ReadAllBytes(file));
            }
            catch (Exception e)
            {
                failures.Add($"{Path.GetRelativePath(Repo.Root, file)}: {e.GetType().Name}: {e.Message}");
            }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
    }

    [Theory]
    [MemberData(nameof(Targets))]
    public void Mutated_seeds_keep_the_invariants(string target)
    {
        // AFL's cheapest mutations (bit flips, interesting values, truncation, byte runs) at fixed random positions:
        // the same inputs every run, so a failure here reproduces.
        var random = new Random(12);
        int[] interesting = [0, 1, 0x7F, 0x80, 0xFF];
        using var t = FuzzTargets.Find(target).Create();
        foreach (var file in Inputs(target))
        {
            var seed = File.ReadAllBytes(file);
            for (int i = 0; i < 12; i++)
            {
                var input = (byte[])seed.Clone();
                if (input.Length == 0)
                    break;
                switch (i % 4)
                {
                    case 0: input[random.Next(input.Length)] ^= (byte)(1 << random.Next(8)); break;
                    case 1: input[random.Next(input.Length)] = (byte)interesting[random.Next(interesting.Length)]; break;
                    case 2: input = input[..random.Next(input.Length)]; break;
                    default:
                        int at = random.Next(input.Length);
                        input.AsSpan(at, Math.Min(4, input.Length - at)).Fill(0xFF);
                        break;
                }
                try
                {
                    t.Run(input);
                }
                catch (Exception e)
                {
                    Assert.Fail($"{Path.GetRelativePath(Repo.Root, file)} mutation {i} ({Convert.ToHexString(input.AsSpan(0, Math.Min(64, input.Length)))}...): {e}");
                }
            }
        }
    }

    [Fact]
    public void Every_corpus_and_regression_directory_names_a_target()
    {
        var names = FuzzTargets.All.Select(t => t.Name).ToHashSet();
        foreach (var dir in new[] { s_corpus, s_regressions }.Where(Directory.Exists).SelectMany(Directory.GetDirectories))
            Assert.True(names.Contains(Path.GetFileName(dir)), $"{dir} is not a fuzz target (tools/fuzz/run.sh --list)");
        foreach (var file in Directory.GetFiles(s_corpus, "*", SearchOption.AllDirectories))
            Assert.True(new FileInfo(file).Length <= 16 * 1024, $"{file}: corpus seeds stay small (a few KB)");
    }

    [Theory]
    [InlineData("loader-bzimage/minimal", "Linux bzImage")]
    [InlineData("loader-elf64/two-segments", "ELF64")]
    [InlineData("loader-pvh/pvh64", "PVH ELF")]
    [InlineData("loader-pvh/pvh32", "PVH ELF")]
    [InlineData("loader-multiboot/aout-kludge", "ultiboot")]
    [InlineData("loader-multiboot/elf32", "ultiboot")]
    public void The_valid_kernel_seeds_load(string seed, string format)
    {
        // A corpus of images the loader refuses would leave the loading code itself unfuzzed.
        using var memory = Vmm.Memory.GuestMemory.Create(64 << 20);
        var kernel = new Vmm.Boot.BootFile("seed", File.ReadAllBytes(Path.Combine(s_corpus, seed)));
        var loaded = Vmm.Boot.KernelLoader.Load(memory, kernel, "console=ttyS0", new Vmm.Boot.BootFile("initrd", new byte[4096]));
        Assert.Contains(format, loaded.Format);
    }

    /// <summary>A device seed the target refuses (at creation, or on a BAR layout the bus cannot place) would leave the
    /// device's own code unfuzzed.</summary>
    [Theory]
    [InlineData("pci-vfio/a100")]
    [InlineData("pci-virtio/driver-bring-up")]
    public void The_valid_device_seeds_are_not_refused(string seed)
    {
        using var t = FuzzTargets.Find(seed.Split('/')[0]).Create();
        int before = FuzzTargets.Refusals;
        t.Run(File.ReadAllBytes(Path.Combine(s_corpus, seed)));
        Assert.Equal(before, FuzzTargets.Refusals);
    }

    [Fact]
    public void The_valid_vmconfig_seeds_are_accepted()
    {
        foreach (var seed in new[] { "vmconfig/full", "vmconfig/minimal" })
            Assert.NotNull(VmConfigTarget.Check(File.ReadAllBytes(Path.Combine(s_corpus, seed))));
    }
}
