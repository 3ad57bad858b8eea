using System.ComponentModel;
using System.Globalization;
using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;
using Vmm.Interop;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Abi;

// The test assembly runs on the JIT, never trimmed or AOT-compiled: reflecting over the interop declarations is the point.

/// <summary>Checks the C# declarations of the KVM uapi (src/Vmm.Interop/Kvm.cs) against the real
/// &lt;linux/kvm.h&gt;: a C probe is generated from the reflected C# declarations, compiled with gcc and run,
/// and every size, offset and value it prints is compared with the C# side. Everything is enumerated by
/// reflection, so a struct, field or constant added later is checked without touching this file (except
/// <see cref="KvmRunMembers"/>, which must name the C member of every <see cref="KvmRunOffsets"/> constant).</summary>
public sealed class KvmAbiTests
{
    // ---------------------------------------------------------------- the real declarations

    [Fact]
    public void Every_kvm_struct_has_the_size_and_field_offsets_of_the_header()
    {
        var structs = typeof(KvmConstants).Assembly.GetTypes()
            .Where(t => t.IsValueType && !t.IsEnum && t.Namespace == typeof(KvmConstants).Namespace
                        && t.Name.StartsWith("kvm_", StringComparison.Ordinal))
            .OrderBy(t => t.Name, StringComparer.Ordinal)
            .Select(t => new StructSpec(t, t.Name))
            .ToList();
        Assert.Contains(structs, s => s.Managed == typeof(kvm_sregs)); // the filter above finds the declarations

        var mismatches = AbiProbe.CompareStructs(structs);

        Assert.True(mismatches.Count == 0,
            $"{mismatches.Count} mismatch(es) between Vmm.Interop structs and <linux/kvm.h>:\n  " + string.Join("\n  ", mismatches));
    }

    [Fact]
    public void Every_KvmConstants_value_equals_its_header_macro()
    {
        var mismatches = AbiProbe.CompareConstants(typeof(KvmConstants));

        Assert.True(mismatches.Count == 0,
            $"{mismatches.Count} mismatch(es) between KvmConstants and <linux/kvm.h>:\n  " + string.Join("\n  ", mismatches));
    }

    /// <summary>The C member (designator for <c>offsetof(struct kvm_run, ...)</c>) of every
    /// <see cref="KvmRunOffsets"/> constant. A constant missing here fails the test.</summary>
    private static readonly Dictionary<string, string> KvmRunMembers = new(StringComparer.Ordinal)
    {
        ["request_interrupt_window"] = "request_interrupt_window",
        ["immediate_exit"] = "immediate_exit",
        ["exit_reason"] = "exit_reason",
        ["ready_for_interrupt_injection"] = "ready_for_interrupt_injection",
        ["if_flag"] = "if_flag",
        ["flags"] = "flags",
        ["cr8"] = "cr8",
        ["apic_base"] = "apic_base",
        ["exit_union"] = "hw", // the first member of the anonymous exit union: its start
        ["io_direction"] = "io.direction",
        ["io_size"] = "io.size",
        ["io_port"] = "io.port",
        ["io_count"] = "io.count",
        ["io_data_offset"] = "io.data_offset",
        ["mmio_phys_addr"] = "mmio.phys_addr",
        ["mmio_data"] = "mmio.data",
        ["mmio_len"] = "mmio.len",
        ["mmio_is_write"] = "mmio.is_write",
        ["hw_hardware_exit_reason"] = "hw.hardware_exit_reason",
        ["fail_entry_hardware_entry_failure_reason"] = "fail_entry.hardware_entry_failure_reason",
        ["fail_entry_cpu"] = "fail_entry.cpu",
        ["ex_exception"] = "ex.exception",
        ["ex_error_code"] = "ex.error_code",
        ["internal_suberror"] = "internal.suberror",
        ["internal_ndata"] = "internal.ndata",
        ["internal_data"] = "internal.data",
        ["system_event_type"] = "system_event.type",
        ["system_event_ndata"] = "system_event.ndata",
        ["system_event_data"] = "system_event.data",
    };

    [Fact]
    public void Every_KvmRunOffsets_value_equals_offsetof_in_struct_kvm_run()
    {
        var mismatches = AbiProbe.CompareRunOffsets(typeof(KvmRunOffsets), KvmRunMembers);

        Assert.True(mismatches.Count == 0,
            $"{mismatches.Count} mismatch(es) between KvmRunOffsets and struct kvm_run in <linux/kvm.h>:\n  " + string.Join("\n  ", mismatches));
    }

    // ---------------------------------------------------------------- self-checks: the comparers can fail

#pragma warning disable CS0649, IDE1006 // layout-only copies of kvm_segment
    /// <summary>kvm_segment with <c>selector</c> widened from __u16 to __u32: everything after it moves.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct kvm_segment_with_wide_selector
    {
        public ulong @base;
        public uint limit;
        public uint selector;
        public byte type;
        public byte present, dpl, db, s, l, g, avl;
        public byte unusable;
        public byte padding;
    }

    /// <summary>kvm_segment with a field the header does not have.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct kvm_segment_with_unknown_field
    {
        public ulong @base;
        public uint limit;
        public ushort selector;
        public byte type;
        public byte present, dpl, db, s, l, g, avl;
        public byte unusable;
        public byte not_in_the_header;
    }

    /// <summary>kvm_segment with <c>present</c> declared as bool: same offsets, but not blittable.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct kvm_segment_with_bool
    {
        public ulong @base;
        public uint limit;
        public ushort selector;
        public byte type;
        [MarshalAs(UnmanagedType.U1)] public bool present;
        public byte dpl, db, s, l, g, avl;
        public byte unusable;
        public byte padding;
    }
#pragma warning restore CS0649, IDE1006

    [Fact]
    public void The_struct_comparer_reports_every_consequence_of_a_wrong_field_type()
    {
        var mismatches = AbiProbe.CompareStructs([new StructSpec(typeof(kvm_segment_with_wide_selector), "kvm_segment")]);

        string all = string.Join("\n", mismatches);
        Assert.Contains("kvm_segment.selector: size C 2, C# 4", all);
        Assert.Contains("kvm_segment.type: offset C 14, C# 16", all);
        Assert.Contains("kvm_segment.padding: offset C 23, C# 25", all);
        Assert.Contains("sizeof(struct kvm_segment) C 24, C# Unsafe.SizeOf 32", all);
        Assert.Contains("sizeof(struct kvm_segment) C 24, C# Marshal.SizeOf 32", all);
        Assert.DoesNotContain("kvm_segment.limit", all); // fields before the wrong one are fine
    }

    [Fact]
    public void The_struct_comparer_fails_on_a_field_the_header_does_not_have()
    {
        var e = Assert.Throws<InvalidOperationException>(
            () => AbiProbe.CompareStructs([new StructSpec(typeof(kvm_segment_with_unknown_field), "kvm_segment")]));
        Assert.Contains("not_in_the_header", e.Message);
    }

    [Fact]
    public void The_struct_comparer_reports_a_field_type_that_is_not_blittable()
    {
        var mismatches = AbiProbe.CompareStructs([new StructSpec(typeof(kvm_segment_with_bool), "kvm_segment")]);

        Assert.Contains("kvm_segment.present: type Boolean is not blittable; Marshal.OffsetOf/SizeOf would not describe the memory layout",
            mismatches);
        Assert.All(mismatches, m => Assert.StartsWith("kvm_segment.present:", m, StringComparison.Ordinal));
    }

    private static class WrongConstants
    {
        public const uint KVM_CREATE_VM = 0xAE02;       // really 0xAE01
        public const uint KVM_GET_REGS = 0x8090AE81;    // right
        public const int KVM_CAP_NOT_A_CAPABILITY = 1;  // not in the header
        public const int KVM_EXIT_NEGATIVE = -1;        // not in the header either
    }

    [Fact]
    public void The_constant_comparer_reports_wrong_and_undefined_macros()
    {
        var mismatches = AbiProbe.CompareConstants(typeof(WrongConstants));

        Assert.Equal(3, mismatches.Count);
        Assert.Contains("KVM_CREATE_VM: C 0xAE01, C# 0xAE02", mismatches);
        Assert.Contains("KVM_CAP_NOT_A_CAPABILITY: not defined by <linux/kvm.h>", mismatches);
        Assert.Contains("KVM_EXIT_NEGATIVE: not defined by <linux/kvm.h>", mismatches);
    }

    private static class WrongRunOffsets
    {
        public const int exit_reason = 8;    // right
        public const int io_port = 36;       // really 34
        public const int io_unmapped = 40;   // no entry in the mapping
    }

    [Fact]
    public void The_kvm_run_comparer_reports_a_wrong_offset_and_an_unmapped_name()
    {
        var mismatches = AbiProbe.CompareRunOffsets(typeof(WrongRunOffsets), KvmRunMembers);

        Assert.Equal(2, mismatches.Count);
        Assert.Contains("io_port (kvm_run.io.port): C 34, C# 36", mismatches);
        Assert.Contains(mismatches, m => m.StartsWith("io_unmapped: no C member", StringComparison.Ordinal));
    }
}

/// <summary>A C# struct and the C <c>struct</c> it declares.</summary>
internal sealed record StructSpec(Type Managed, string CName);

/// <summary>Generates, compiles (gcc -std=gnu11 -Wall -Werror against the installed &lt;linux/kvm.h&gt;) and runs
/// a C probe that prints <c>key value</c> lines, and compares them with the C# declarations. Each comparer
/// returns every mismatch as one line; a probe that does not compile or run throws with gcc's output.</summary>
internal static class AbiProbe
{
    private const BindingFlags InstanceFields = BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance;

    /// <param name="header">The header that declares the structs (default &lt;linux/kvm.h&gt;).</param>
    /// <param name="includeDir">An extra -I directory searched before the system headers (vendored uapi headers).</param>
    public static List<string> CompareStructs(IReadOnlyList<StructSpec> structs, string header = "linux/kvm.h", string? includeDir = null)
    {
        var body = new StringBuilder();
        foreach (var s in structs)
        {
            body.AppendLine(CultureInfo.InvariantCulture,
                $"    printf(\"size {s.CName} %zu\\n\", sizeof(struct {s.CName}));");
            foreach (var f in s.Managed.GetFields(InstanceFields))
            {
                body.AppendLine(CultureInfo.InvariantCulture,
                    $"    printf(\"offset {s.CName} {f.Name} %zu\\n\", offsetof(struct {s.CName}, {f.Name}));");
                body.AppendLine(CultureInfo.InvariantCulture,
                    $"    printf(\"fieldsize {s.CName} {f.Name} %zu\\n\", sizeof(((struct {s.CName} *)0)->{f.Name}));");
            }
        }
        var c = Run(body.ToString(), header, includeDir);

        var mismatches = new List<string>();
        foreach (var s in structs)
        {
            var t = s.Managed;
            long unsafeSize = (int)typeof(Unsafe).GetMethod(nameof(Unsafe.SizeOf))!.MakeGenericMethod(t).Invoke(null, null)!;
            long marshalSize = Marshal.SizeOf(t);
            if (Lookup(c, $"size {s.CName}", mismatches) is { } cSize)
            {
                if (cSize != (ulong)unsafeSize)
                    mismatches.Add($"sizeof(struct {s.CName}) C {cSize}, C# Unsafe.SizeOf {unsafeSize} ({t.Name})");
                if (cSize != (ulong)marshalSize)
                    mismatches.Add($"sizeof(struct {s.CName}) C {cSize}, C# Marshal.SizeOf {marshalSize} ({t.Name})");
            }
            foreach (var f in t.GetFields(InstanceFields))
            {
                string where = $"{s.CName}.{f.Name}";
                if (NonBlittable(f) is { } why)
                    mismatches.Add($"{where}: {why}; Marshal.OffsetOf/SizeOf would not describe the memory layout");
                long offset = Marshal.OffsetOf(t, f.Name).ToInt64();
                if (Lookup(c, $"offset {s.CName} {f.Name}", mismatches) is { } cOffset && cOffset != (ulong)offset)
                    mismatches.Add($"{where}: offset C {cOffset}, C# {offset}");
                long size = FieldSize(f);
                if (Lookup(c, $"fieldsize {s.CName} {f.Name}", mismatches) is { } cFieldSize && cFieldSize != (ulong)size)
                    mismatches.Add($"{where}: size C {cFieldSize}, C# {size} ({FieldTypeName(f)})");
            }
        }
        return mismatches;
    }

    /// <param name="header">The header that defines the macros (default &lt;linux/kvm.h&gt;).</param>
    /// <param name="includeDir">An extra -I directory searched before the system headers (vendored uapi headers).</param>
    /// <param name="enumerators">Constants that are C enumerators, not macros (#ifdef cannot see them).</param>
    public static List<string> CompareConstants(Type holder, string header = "linux/kvm.h", string? includeDir = null,
        IReadOnlySet<string>? enumerators = null)
    {
        var constants = holder.GetFields(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Static)
            .Where(f => f.IsLiteral || f.IsInitOnly)
            .ToList();
        var body = new StringBuilder();
        foreach (var f in constants)
        {
            if (enumerators?.Contains(f.Name) == true)
            {
                body.AppendLine(CultureInfo.InvariantCulture,
                    $"    printf(\"const {f.Name} %llu\\n\", (unsigned long long)({f.Name}));");
                continue;
            }
            body.AppendLine(CultureInfo.InvariantCulture, $"#ifdef {f.Name}");
            body.AppendLine(CultureInfo.InvariantCulture,
                $"    printf(\"const {f.Name} %llu\\n\", (unsigned long long)({f.Name}));");
            body.AppendLine("#else");
            body.AppendLine(CultureInfo.InvariantCulture, $"    printf(\"undefined {f.Name} 0\\n\");");
            body.AppendLine("#endif");
        }
        var c = Run(body.ToString(), header, includeDir);

        var mismatches = new List<string>();
        foreach (var f in constants)
        {
            object? value = f.IsLiteral ? f.GetRawConstantValue() : f.GetValue(null);
            if (ToC(value) is not { } managed)
            {
                mismatches.Add($"{f.Name}: C# value {value ?? "null"} ({f.FieldType.Name}) is not an integer");
                continue;
            }
            if (c.ContainsKey($"undefined {f.Name}"))
                mismatches.Add($"{f.Name}: not defined by <{header}>");
            else if (Lookup(c, $"const {f.Name}", mismatches) is { } cValue && cValue != managed)
                mismatches.Add($"{f.Name}: C 0x{cValue:X}, C# 0x{managed:X}");
        }
        return mismatches;
    }

    public static List<string> CompareRunOffsets(Type holder, IReadOnlyDictionary<string, string> members)
    {
        var mismatches = new List<string>();
        var mapped = new List<(FieldInfo Field, string Member)>();
        foreach (var f in holder.GetFields(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Static).Where(f => f.IsLiteral))
        {
            if (members.TryGetValue(f.Name, out var member))
                mapped.Add((f, member));
            else
                mismatches.Add($"{f.Name}: no C member of struct kvm_run is mapped to it; add it to the test's KvmRunMembers");
        }
        var body = new StringBuilder();
        foreach (var (f, member) in mapped)
            body.AppendLine(CultureInfo.InvariantCulture,
                $"    printf(\"runoffset {f.Name} %zu\\n\", offsetof(struct kvm_run, {member}));");
        var c = Run(body.ToString());

        foreach (var (f, member) in mapped)
        {
            if (ToC(f.GetRawConstantValue()) is not { } managed)
                mismatches.Add($"{f.Name}: C# value is not an integer");
            else if (Lookup(c, $"runoffset {f.Name}", mismatches) is { } cOffset && cOffset != managed)
                mismatches.Add($"{f.Name} (kvm_run.{member}): C {cOffset}, C# {(long)managed}");
        }
        return mismatches;
    }

    /// <summary>The value a C integer of the same signedness prints after a cast to unsigned long long.</summary>
    private static ulong? ToC(object? value) => value switch
    {
        sbyte or short or int or long or nint => unchecked((ulong)Convert.ToInt64(value, CultureInfo.InvariantCulture)),
        byte or ushort or uint or ulong or nuint => Convert.ToUInt64(value, CultureInfo.InvariantCulture),
        Enum e => ToC(Convert.ChangeType(e, Enum.GetUnderlyingType(e.GetType()), CultureInfo.InvariantCulture)),
        _ => null,
    };

    private static ulong? Lookup(Dictionary<string, ulong> c, string key, List<string> mismatches)
    {
        if (c.TryGetValue(key, out var v))
            return v;
        mismatches.Add($"the C probe printed no '{key}' line");
        return null;
    }

    private static long FieldSize(FieldInfo f)
    {
        if (f.GetCustomAttribute<FixedBufferAttribute>() is { } fixedBuffer)
            return (long)fixedBuffer.Length * Marshal.SizeOf(fixedBuffer.ElementType);
        var t = f.FieldType.IsEnum ? Enum.GetUnderlyingType(f.FieldType) : f.FieldType;
        return Marshal.SizeOf(t);
    }

    private static string FieldTypeName(FieldInfo f) =>
        f.GetCustomAttribute<FixedBufferAttribute>() is { } fb ? $"fixed {fb.ElementType.Name}[{fb.Length}]" : f.FieldType.Name;

    private static readonly HashSet<Type> BlittableLeaves =
    [
        typeof(byte), typeof(sbyte), typeof(short), typeof(ushort), typeof(int), typeof(uint),
        typeof(long), typeof(ulong), typeof(nint), typeof(nuint), typeof(float), typeof(double),
    ];

    /// <summary>Why the field's memory layout may differ from its marshalled layout, or null.</summary>
    private static string? NonBlittable(FieldInfo f)
    {
        if (f.GetCustomAttribute<FixedBufferAttribute>() is { } fb)
            return BlittableLeaves.Contains(fb.ElementType) ? null : $"fixed buffer of {fb.ElementType.Name}";
        var t = f.FieldType.IsEnum ? Enum.GetUnderlyingType(f.FieldType) : f.FieldType;
        if (BlittableLeaves.Contains(t) || t.IsPointer)
            return null;
        if (t.IsValueType && !t.IsPrimitive)
            return t.GetFields(InstanceFields).Select(NonBlittable).FirstOrDefault(w => w is not null) is { } inner
                ? $"{t.Name} contains {inner}" : null;
        return $"type {t.Name} is not blittable";
    }

    /// <summary>Compiles and runs a probe whose main() has <paramref name="body"/>; returns its lines as
    /// <c>everything before the last space</c> → <c>the number after it</c>.</summary>
    private static Dictionary<string, ulong> Run(string body, string header = "linux/kvm.h", string? includeDir = null)
    {
        string source = $$"""
            /* Generated by tests/Vmm.Tests/Abi/KvmAbiTests.cs from the C# declarations in src/Vmm.Interop/Kvm.cs. */
            #include <stddef.h>
            #include <stdio.h>
            #include <linux/ioctl.h> /* <linux/if_tun.h> uses _IOW without including it */
            #include <{{header}}>

            int main(void)
            {
            {{body}}    return 0;
            }

            """;
        var dir = Directory.CreateTempSubdirectory("vmm-kvm-abi-");
        try
        {
            string c = Path.Combine(dir.FullName, "kvm_abi_probe.c");
            string exe = Path.Combine(dir.FullName, "kvm_abi_probe");
            File.WriteAllText(c, source);
            Repo.Result cc;
            try
            {
                string[] include = includeDir is null ? [] : ["-I", includeDir];
                cc = Repo.Run("gcc", ["-std=gnu11", "-Wall", "-Werror", .. include, "-o", exe, c], dir.FullName, TimeSpan.FromMinutes(2));
            }
            catch (Win32Exception e)
            {
                throw new InvalidOperationException("the KVM ABI test needs gcc and the Linux uapi headers (linux-libc-dev): " + e.Message, e);
            }
            if (cc.ExitCode != 0)
                throw new InvalidOperationException(
                    $"the generated KVM ABI probe does not compile against <{header}> (gcc exit {cc.ExitCode}):\n{cc.Stderr}{cc.Stdout}\n--- probe source ---\n{source}");
            var run = Repo.Run(exe, [], dir.FullName, TimeSpan.FromMinutes(1));
            if (run.ExitCode != 0)
                throw new InvalidOperationException($"the KVM ABI probe exited with {run.ExitCode}:\n{run.Stdout}\n{run.Stderr}");

            var values = new Dictionary<string, ulong>(StringComparer.Ordinal);
            foreach (var line in run.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                int space = line.LastIndexOf(' ');
                if (space <= 0 || !ulong.TryParse(line.AsSpan(space + 1), NumberStyles.None, CultureInfo.InvariantCulture, out var v)
                    || !values.TryAdd(line[..space], v))
                    throw new InvalidOperationException($"the KVM ABI probe printed an unexpected line '{line}':\n{run.Stdout}");
            }
            return values;
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}
