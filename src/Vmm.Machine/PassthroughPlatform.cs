using Vmm.Devices.Vfio;
using Vmm.Interop;
using Vmm.Kvm;
using Vmm.Memory;

namespace Vmm.Machine;

/// <summary>KVM memory slots beyond guest RAM, handed out for BAR mappings of passed-through devices: a BAR area
/// the device lets vmm mmap becomes a slot, so the guest reaches device memory without exits. With peer-to-peer
/// DMA on, every slot is also mapped at IOVA = guest address in the DMA spaces that asked for it.</summary>
internal sealed class KvmBarMapper : IGuestMemoryMapper
{
    private readonly VmFd _vm;
    private readonly Log _log;
    private readonly Lock _lock = new();
    private readonly SortedSet<uint> _free = [];
    private readonly List<IVfioDmaSpace> _peerToPeer = [];
    private readonly List<Slot> _live = [];

    /// <param name="firstSlot">The first slot not used by guest RAM.</param>
    /// <param name="slotCount">KVM_CAP_NR_MEMSLOTS.</param>
    public KvmBarMapper(VmFd vm, Log log, uint firstSlot, int slotCount)
    {
        _vm = vm;
        _log = log;
        for (uint s = firstSlot; s < (uint)slotCount; s++)
            _free.Add(s);
    }

    /// <summary>Also maps every BAR slot, now and later, for DMA in <paramref name="space"/> (peer to peer).</summary>
    public void AddPeerToPeerSpace(IVfioDmaSpace space)
    {
        lock (_lock)
        {
            if (!_peerToPeer.Contains(space))
                _peerToPeer.Add(space);
        }
    }

    public IDisposable Map(ulong guestAddress, ulong size, nint hostAddress, string name, int fd = -1, long fileOffset = 0)
    {
        lock (_lock)
        {
            if (_free.Count == 0)
                throw new VfioException($"{name}: no free KVM memory slot for 0x{size:x} bytes at 0x{guestAddress:x}");
            uint slot = _free.Min;
            _vm.SetUserMemoryRegion(slot, guestAddress, size, hostAddress);
            _free.Remove(slot);
            var mapped = new List<IVfioDmaSpace>();
            foreach (var space in _peerToPeer)
            {
                try
                {
                    space.Map(guestAddress, size, hostAddress, fd, fileOffset, writable: true);
                    mapped.Add(space);
                }
                catch (VfioException e)
                {
                    _log.Warn($"{name}: peer-to-peer DMA mapping at 0x{guestAddress:x} failed: {e.Message}");
                }
            }
            _log.Debug($"{name}: KVM slot {slot} maps 0x{size:x} bytes at 0x{guestAddress:x}");
            var handle = new Slot(this, slot, guestAddress, size, mapped, name);
            _live.Add(handle);
            return handle;
        }
    }

    /// <summary>Teardown, before any device closes: removes every BAR from the peer-to-peer DMA spaces (a vfio-user
    /// unmap is a message to a server that must still be connected) and maps no more.</summary>
    public void StopPeerToPeer()
    {
        lock (_lock)
        {
            foreach (var s in _live)
                UnmapPeerToPeerLocked(s);
            _peerToPeer.Clear();
        }
    }

    /// <summary>Hot removal of the last device of <paramref name="space"/>: every BAR slot leaves it, and later slots
    /// are not mapped in it.</summary>
    public void RemovePeerToPeerSpace(IVfioDmaSpace space)
    {
        lock (_lock)
        {
            if (!_peerToPeer.Remove(space))
                return;
            foreach (var s in _live)
            {
                if (!s.PeerToPeer.Remove(space))
                    continue;
                try
                {
                    space.Unmap(s.GuestAddress, s.Size);
                }
                catch (VfioException e)
                {
                    _log.Warn($"{s.Name}: peer-to-peer DMA unmap at 0x{s.GuestAddress:x} failed: {e.Message}");
                }
            }
        }
    }

    private void UnmapPeerToPeerLocked(Slot s)
    {
        foreach (var space in s.PeerToPeer)
        {
            try
            {
                space.Unmap(s.GuestAddress, s.Size);
            }
            catch (VfioException e)
            {
                _log.Warn($"{s.Name}: peer-to-peer DMA unmap at 0x{s.GuestAddress:x} failed: {e.Message}");
            }
        }
        s.PeerToPeer.Clear();
    }

    private void Unmap(Slot s)
    {
        lock (_lock)
        {
            _live.Remove(s);
            UnmapPeerToPeerLocked(s);
            // Deleting a slot only fails for a slot KVM does not know, which would be our bug; report, keep going.
            try
            {
                _vm.SetUserMemoryRegion(s.Number, s.GuestAddress, 0, 0);
            }
            catch (KvmException e)
            {
                _log.Warn($"{s.Name}: {e.Message}");
            }
            _free.Add(s.Number);
        }
    }

    private sealed class Slot(KvmBarMapper owner, uint number, ulong guestAddress, ulong size, List<IVfioDmaSpace> peerToPeer, string name) : IDisposable
    {
        private int _disposed;
        public uint Number => number;
        public ulong GuestAddress => guestAddress;
        public ulong Size => size;
        public List<IVfioDmaSpace> PeerToPeer => peerToPeer;
        public string Name => name;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
                owner.Unmap(this);
        }
    }
}

/// <summary>A passed-through function's INTx pin: KVM_IRQFD with a resample fd on the pin's IOAPIC input. The
/// kernel ORs it with the other sources of that shared line (emulated devices use KVM_IRQ_LINE).</summary>
internal sealed class KvmIntxIrqfdLine(VmFd vm, uint gsi) : IIntxIrqfdLine
{
    public uint Gsi => gsi;

    public IDisposable Attach(EventFd trigger, EventFd resample)
    {
        vm.AssignIrqfd(trigger.Fd, gsi, resample.Fd);
        return new Attachment(vm, trigger, gsi);
    }

    private sealed class Attachment(VmFd vm, EventFd trigger, uint gsi) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
                vm.DeassignIrqfd(trigger.Fd, gsi);
        }
    }
}

/// <summary>All guest RAM mapped for device DMA at IOVA = guest-physical address, once per DMA space (a container,
/// an IOAS or a vfio-user connection may serve several devices), and unmapped on teardown. Guest RAM is fixed for
/// the life of the VM (no hotplug or balloon yet), so the mappings never change while it runs.</summary>
internal sealed class GuestRamDma(GuestMemory memory, Log log) : IDisposable
{
    private readonly List<(IVfioDmaSpace Space, ulong Iova, ulong Size)> _mapped = [];

    /// <summary>Maps every RAM region in <paramref name="space"/> unless that space has it already.</summary>
    public void MapAll(IVfioDmaSpace space, string deviceName)
    {
        if (_mapped.Any(m => ReferenceEquals(m.Space, space)))
            return;
        foreach (var region in memory.Regions)
        {
            space.Map(region.Start.Value, region.Size, region.HostAddress, memory.MemFd, region.FileOffset, writable: true);
            _mapped.Add((space, region.Start.Value, region.Size));
            log.Debug($"{deviceName}: DMA maps guest RAM {region.Start}+0x{region.Size:x} at the same IOVA");
        }
    }

    /// <summary>Hot removal of the last device of <paramref name="space"/>: guest RAM leaves it (while the device is
    /// still connected: a vfio-user unmap is a message to its server).</summary>
    public void Unmap(IVfioDmaSpace space)
    {
        for (int i = _mapped.Count - 1; i >= 0; i--)
        {
            var (s, iova, size) = _mapped[i];
            if (!ReferenceEquals(s, space))
                continue;
            _mapped.RemoveAt(i);
            try
            {
                s.Unmap(iova, size);
            }
            catch (VfioException e)
            {
                log.Warn($"DMA unmap of 0x{iova:x}+0x{size:x}: {e.Message}");
            }
        }
    }

    public void Dispose()
    {
        for (int i = _mapped.Count - 1; i >= 0; i--)
        {
            var (space, iova, size) = _mapped[i];
            try
            {
                space.Unmap(iova, size);
            }
            catch (VfioException e)
            {
                log.Warn($"DMA unmap of 0x{iova:x}+0x{size:x}: {e.Message}");
            }
        }
        _mapped.Clear();
    }
}
