namespace Vmm.Memory;

/// <summary>A guest-physical address. A distinct type so host pointers, offsets and port numbers cannot be
/// passed where a guest address is meant.</summary>
public readonly record struct GuestAddress(ulong Value) : IComparable<GuestAddress>
{
    public GuestAddress Add(ulong offset) => new(checked(Value + offset));

    public int CompareTo(GuestAddress other) => Value.CompareTo(other.Value);

    public override string ToString() => $"0x{Value:x}";

    public static bool operator <(GuestAddress a, GuestAddress b) => a.Value < b.Value;
    public static bool operator >(GuestAddress a, GuestAddress b) => a.Value > b.Value;
    public static bool operator <=(GuestAddress a, GuestAddress b) => a.Value <= b.Value;
    public static bool operator >=(GuestAddress a, GuestAddress b) => a.Value >= b.Value;
}

/// <summary>An access outside guest RAM. Devices turn it into a device error; loaders into a precise message.</summary>
public sealed class GuestMemoryException(GuestAddress address, ulong length, string message) : Exception(message)
{
    public GuestAddress Address { get; } = address;
    public ulong Length { get; } = length;
}
