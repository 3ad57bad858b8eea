using Vmm.Interop;

namespace Vmm.Devices.Vfio;

/// <summary>Maps host memory (an mmapped BAR area) into guest-physical address space without exits: the machine
/// implements it with a KVM memory slot. Disposing the handle removes the slot.</summary>
public interface IGuestMemoryMapper
{
    /// <summary>Maps [<paramref name="hostAddress"/>, +<paramref name="size"/>) at <paramref name="guestAddress"/>
    /// (both page aligned). <paramref name="name"/> is for messages ("0000:01:00.0 BAR1"). <paramref name="fd"/> at
    /// <paramref name="fileOffset"/> is the same memory as a file (-1: none), for peer-to-peer DMA maps that pass
    /// memory by file descriptor.</summary>
    IDisposable Map(ulong guestAddress, ulong size, nint hostAddress, string name, int fd = -1, long fileOffset = 0);
}

/// <summary>A device's level-triggered INTx pin in the kernel: KVM_IRQFD on the pin's GSI with
/// KVM_IRQFD_FLAG_RESAMPLE. <c>trigger</c> asserts the line; KVM signals <c>resample</c> when the guest EOIs it
/// (and deasserts the line), so the device can unmask and re-raise if it still needs service.</summary>
public interface IIntxIrqfdLine
{
    /// <summary>Connects the pair; disposing the handle deassigns the irqfd.</summary>
    IDisposable Attach(EventFd trigger, EventFd resample);
}
