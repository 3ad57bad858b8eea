namespace Vmm.Interop.Seccomp;

/// <summary>The thread roles that get their own filter (docs in SeccompFilters.cs of Vmm.Machine, where the lists are).</summary>
public enum SeccompRole
{
    /// <summary>The whole process: installed by the main thread on every thread (TSYNC) before any VM thread
    /// starts; the superset the role filters below tighten.</summary>
    Main,
    Vcpu,
    DeviceWorker,
    Api,
    Console,
}

/// <summary>What <c>--seccomp</c> asks for: <c>on</c> traps a forbidden call (SIGSYS, one line, the process dies),
/// <c>log</c> lets it through and the kernel logs it (audit type 1326), <c>off</c> installs nothing.</summary>
public enum SeccompMode
{
    Off,
    Log,
    On,
}

/// <summary>One condition on a system call argument: <c>(args[Index] &amp; Mask) == Value</c>. With
/// <see cref="Low32"/> only the low 32 bits are compared — right for arguments the kernel declares as 32-bit
/// (ioctl's <c>unsigned int cmd</c>), whose upper register half the kernel ignores and a caller may sign-extend.</summary>
public readonly record struct ArgMatch(int Index, ulong Value, ulong Mask = ulong.MaxValue, bool Low32 = false)
{
    public bool Matches(ulong arg) => Low32
        ? ((uint)arg & (uint)Mask) == (uint)Value
        : (arg & Mask) == Value;
}

/// <summary>One allow-list entry: system call <see cref="Name"/>, allowed when any of <see cref="When"/>'s
/// alternatives matches in full (no alternatives: always), with <see cref="Why"/> for the reader.
/// <see cref="Action"/> is what a match returns (ALLOW, or e.g. ERRNO(ENOSYS) for clone3).</summary>
public sealed record SyscallRule(string Name, string Why, IReadOnlyList<ArgMatch[]>? When = null,
    uint Action = Bpf.SECCOMP_RET_ALLOW)
{
    public int Number { get; } = Syscalls.Number(Name);
}

/// <summary>A role's allow list and its compilation to classic BPF.</summary>
public sealed class SeccompFilter(SeccompRole role, IReadOnlyList<SyscallRule> rules)
{
    public SeccompRole Role { get; } = role;

    /// <summary>In program order: the first rules are the ones a hot path hits (KVM_RUN's ioctl on a vCPU).</summary>
    public IReadOnlyList<SyscallRule> Rules { get; } = Check(rules);

    private static IReadOnlyList<SyscallRule> Check(IReadOnlyList<SyscallRule> rules)
    {
        var seen = new HashSet<int>();
        foreach (var r in rules)
            if (!seen.Add(r.Number))
                throw new ArgumentException($"{r.Name} is listed twice (the first entry would hide the second)");
        return rules;
    }

    /// <summary>The program: the architecture must be x86-64 and the number below the x32 bit, else
    /// <paramref name="defaultAction"/>; then one test per rule (its arguments checked in place); anything
    /// else gets <paramref name="defaultAction"/>. Jumps are relative and short, so every rule's code stays next
    /// to its test and no jump needs more than BPF's 8-bit offset.</summary>
    public sock_filter[] Compile(uint defaultAction)
    {
        var p = new List<sock_filter>
        {
            Bpf.LoadAbs(Bpf.OffsetArch),
            Bpf.Jump(Bpf.BPF_JMP | Bpf.BPF_JEQ | Bpf.BPF_K, Bpf.AUDIT_ARCH_X86_64, 1, 0),
            Bpf.Ret(defaultAction),
            Bpf.LoadAbs(Bpf.OffsetNr),
            Bpf.Jump(Bpf.BPF_JMP | Bpf.BPF_JGE | Bpf.BPF_K, Bpf.X32_SYSCALL_BIT, 0, 1),
            Bpf.Ret(defaultAction),
        };
        foreach (var rule in Rules)
        {
            var body = Body(rule, defaultAction);
            p.Add(Bpf.Jump(Bpf.BPF_JMP | Bpf.BPF_JEQ | Bpf.BPF_K, (uint)rule.Number, 0, ShortJump(body.Count, rule)));
            p.AddRange(body);
        }
        p.Add(Bpf.Ret(defaultAction));
        if (p.Count > Bpf.MaxInstructions)
            throw new InvalidOperationException($"the {Role} filter has {p.Count} instructions (BPF allows {Bpf.MaxInstructions})");
        return p.ToArray();
    }

    /// <summary>A rule's code after its number matched: ALLOW, or per alternative the argument tests (a failed test
    /// jumps to the next alternative) then the action; after the last alternative the default action. Every path
    /// ends in a return, so the accumulator (the number) is only clobbered on paths that return.</summary>
    private static List<sock_filter> Body(SyscallRule rule, uint defaultAction)
    {
        var body = new List<sock_filter>();
        if (rule.When is null || rule.When.Count == 0)
        {
            body.Add(Bpf.Ret(rule.Action));
            return body;
        }
        foreach (var alternative in rule.When)
        {
            var alt = new List<sock_filter>();
            // Each test's "no" offset is patched once the alternative's length is known: it lands on the next
            // alternative, i.e. just past this alternative's final return.
            var failJumps = new List<int>();
            foreach (var m in alternative)
            {
                if (m.Index is < 0 or > 5)
                    throw new ArgumentException($"{rule.Name}: argument index {m.Index}");
                uint low = Bpf.OffsetArgs + 8 * (uint)m.Index;
                if (!m.Low32)
                    AddTest(alt, failJumps, low + 4, (uint)(m.Mask >> 32), (uint)(m.Value >> 32));
                AddTest(alt, failJumps, low, (uint)m.Mask, (uint)m.Value);
            }
            alt.Add(Bpf.Ret(rule.Action));
            foreach (int i in failJumps)
            {
                var j = alt[i];
                alt[i] = j with { jf = ShortJump(alt.Count - i - 1, rule) };
            }
            body.AddRange(alt);
        }
        body.Add(Bpf.Ret(defaultAction));
        return body;
    }

    private static void AddTest(List<sock_filter> alt, List<int> failJumps, uint offset, uint mask, uint value)
    {
        alt.Add(Bpf.LoadAbs(offset));
        if (mask != uint.MaxValue)
            alt.Add(Bpf.Stmt(Bpf.BPF_ALU | Bpf.BPF_AND | Bpf.BPF_K, mask));
        failJumps.Add(alt.Count);
        alt.Add(Bpf.Jump(Bpf.BPF_JMP | Bpf.BPF_JEQ | Bpf.BPF_K, value, 0, 0));
    }

    private static byte ShortJump(int distance, SyscallRule rule) => distance <= byte.MaxValue
        ? (byte)distance
        : throw new InvalidOperationException($"{rule.Name}: its argument tests need {distance} instructions (a BPF jump reaches 255)");

    /// <summary>What the filter decides for one call, without the kernel (the same rules, read directly): for
    /// tests and for <c>vmm</c>'s own checks. The compiled program must agree (tests run both).</summary>
    public uint Evaluate(uint arch, int nr, ReadOnlySpan<ulong> args, uint defaultAction)
    {
        if (arch != Bpf.AUDIT_ARCH_X86_64 || (uint)nr >= Bpf.X32_SYSCALL_BIT)
            return defaultAction;
        foreach (var rule in Rules)
        {
            if (rule.Number != nr)
                continue;
            if (rule.When is null || rule.When.Count == 0)
                return rule.Action;
            foreach (var alternative in rule.When)
            {
                bool all = true;
                foreach (var m in alternative)
                    all &= m.Matches(args[m.Index]);
                if (all)
                    return rule.Action;
            }
            return defaultAction;
        }
        return defaultAction;
    }
}
