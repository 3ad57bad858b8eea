namespace Xunit;

/// <summary>The few xunit assertions the linked test-kit fakes make (FakeVfioDevice checks what the VMM asks of it).
/// Here a failed one throws <see cref="FuzzInvariantException"/>: a broken invariant, a crash to afl-fuzz.</summary>
internal static class Assert
{
    public static void True(bool condition, string? message = null)
    {
        if (!condition)
            throw new Vmm.Fuzz.FuzzInvariantException("Assert.True failed: " + message);
    }

    public static void Fail(string message) => True(false, message);

    public static void False(bool condition, string? message = null) => True(!condition, message);

    public static void Null(object? value) => True(value is null, $"expected null, got {value}");

    public static void DoesNotContain<T>(IEnumerable<T> collection, Predicate<T> filter)
    {
        foreach (var item in collection)
            True(!filter(item), $"found {item}");
    }
}
