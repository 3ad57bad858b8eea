namespace Vmm.Boot;

/// <summary>A kernel or module image that cannot be loaded. The message names the header, the field and its
/// file offset, so the user can find the fault with a hex dump.</summary>
public sealed class KernelImageException(string message) : Exception(message);
