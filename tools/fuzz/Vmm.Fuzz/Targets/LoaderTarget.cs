using Vmm.Boot;
using Vmm.Memory;

namespace Vmm.Fuzz;

/// <summary>A kernel loader on 64 MiB of guest RAM (the layout vmm uses) with a 4 KiB initrd/module and a command
/// line. Input: the kernel image itself, so every seed is a real image. bzImage goes to LinuxLoader directly; PVH,
/// multiboot and ELF64 through KernelLoader's format detection, as `--kernel` does.
/// Invariants: a malformed image is refused with <see cref="KernelImageException"/> (the one-line "clear error" the
/// CLI prints with status 6) — never another exception, in particular never a <see cref="GuestMemoryException"/>
/// (that would mean the loader tried to write outside RAM on the image's say-so); an accepted image's kernel and
/// module ranges lie inside RAM.</summary>
public sealed class LoaderTarget : IFuzzTarget
{
    public enum Kind { BzImage, Pvh, Multiboot, Elf64 }

    private const ulong RamSize = 64 << 20;
    private static readonly BootFile s_module = new("initrd.img", new byte[4096]);
    private readonly GuestMemory _memory = GuestMemory.Create(RamSize);
    private readonly Kind _kind;

    public LoaderTarget(Kind kind) => _kind = kind;

    public void Run(ReadOnlySpan<byte> input)
    {
        var kernel = new BootFile("fuzz-kernel", input.ToArray());
        LoadedKernel loaded;
        try
        {
            loaded = _kind == Kind.BzImage
                ? LinuxLoader.Load(_memory, kernel, "console=ttyS0 panic=-1", s_module)
                : KernelLoader.Load(_memory, kernel, "console=ttyS0 panic=-1", s_module);
        }
        catch (KernelImageException e)
        {
            FuzzTargets.Explain(e.Message);
            if (string.IsNullOrWhiteSpace(e.Message) || e.Message.Contains('\n'))
                throw new FuzzInvariantException($"a loader error that is not one line: '{e.Message}'");
            return;
        }
        foreach (var (start, end) in loaded.KernelRanges)
        {
            if (end < start || (end > start && !_memory.IsValidRange(new GuestAddress(start), end - start)))
                throw new FuzzInvariantException($"{loaded.Format}: kernel range 0x{start:x}-0x{end:x} is not inside RAM");
        }
        if (loaded.Module is var (ms, me) && (me < ms || (me > ms && !_memory.IsValidRange(new GuestAddress(ms), me - ms))))
            throw new FuzzInvariantException($"{loaded.Format}: module range 0x{ms:x}-0x{me:x} is not inside RAM");
    }

    public void Dispose() => _memory.Dispose();
}
