using Vmm.Devices.Pci;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Kvm;
using static Vmm.Interop.KvmConstants;

namespace Vmm.Machine;

/// <summary>MSI vectors as KVM GSI routes fed by irqfds: a device thread's eventfd write becomes an interrupt in
/// the kernel, with no exit and no code of ours on a vCPU. Owns the VM's whole GSI routing table, because
/// KVM_SET_GSI_ROUTING replaces it: the in-kernel PIC/IOAPIC pins are kept as KVM's default routing has them.</summary>
internal sealed class KvmMsiController(VmFd vm) : IMsiController, IDisposable
{
    /// <summary>GSIs below this are the IOAPIC's 24 pins.</summary>
    public const uint FirstMsiGsi = 24;

    private readonly Lock _lock = new();
    private readonly List<Vector> _vectors = [];
    private readonly SortedSet<uint> _freeGsis = [];
    private uint _nextGsi = FirstMsiGsi;

    private VmFd Vm => vm;

    public IMsiVector CreateVector(string owner, int index)
    {
        lock (_lock)
        {
            uint gsi = _freeGsis.Count > 0 ? _freeGsis.Min : _nextGsi++;
            _freeGsis.Remove(gsi);
            var v = new Vector(this, gsi, $"{owner} MSI-X vector {index}");
            vm.AssignIrqfd(v.EventFd.Fd, v.Gsi);
            _vectors.Add(v);
            return v;
        }
    }

    /// <summary>Gives back the vectors of a hot-removed device: irqfds deassigned, routes dropped, eventfds closed,
    /// GSIs free for the next device.</summary>
    public void Release(IEnumerable<IMsiVector> vectors)
    {
        lock (_lock)
        {
            bool routed = false;
            foreach (var v in vectors.OfType<Vector>())
            {
                if (!_vectors.Remove(v))
                    continue;
                if (!v.Masked)
                    vm.DeassignIrqfd(v.EventFd.Fd, v.Gsi);
                routed |= v.Address is not null;
                v.EventFd.Dispose();
                _freeGsis.Add(v.Gsi);
            }
            if (routed)
                Update();
        }
    }

    /// <summary>Installs the routing table: irqchip pins plus every configured MSI route.</summary>
    private void Update()
    {
        var routes = new List<kvm_irq_routing_entry>();
        for (uint gsi = 0; gsi < 24; gsi++)
        {
            if (gsi < 16)
                routes.Add(Irqchip(gsi, gsi < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE, gsi % 8));
            routes.Add(Irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        foreach (var v in _vectors)
        {
            if (v.Address is ulong address)
                routes.Add(Msi(v.Gsi, address, v.Data));
        }
        vm.SetGsiRouting(routes.ToArray());
    }

    private static unsafe kvm_irq_routing_entry Irqchip(uint gsi, uint chip, uint pin)
    {
        var e = new kvm_irq_routing_entry { gsi = gsi, type = KVM_IRQ_ROUTING_IRQCHIP };
        e.u[0] = chip;
        e.u[1] = pin;
        return e;
    }

    private static unsafe kvm_irq_routing_entry Msi(uint gsi, ulong address, uint data)
    {
        var e = new kvm_irq_routing_entry { gsi = gsi, type = KVM_IRQ_ROUTING_MSI };
        e.u[0] = (uint)address;
        e.u[1] = (uint)(address >> 32);
        e.u[2] = data;
        return e;
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var v in _vectors)
                v.EventFd.Dispose();
            _vectors.Clear();
        }
    }

    private sealed class Vector(KvmMsiController owner, uint gsi, string name) : IMsiVector
    {
        public EventFd EventFd { get; } = new();
        public uint Gsi { get; } = gsi;
        public string Name { get; } = name;
        public ulong? Address { get; private set; }
        public uint Data { get; private set; }

        public void Configure(ulong address, uint data)
        {
            lock (owner._lock)
            {
                if (Address == address && Data == data)
                    return;
                Address = address;
                Data = data;
                owner.Update();
            }
        }

        public void Trigger() => EventFd.Signal();

        private bool _masked;

        public bool Masked => _masked;

        /// <summary>Masking deassigns the irqfd: the eventfd keeps counting, and KVM_IRQFD on unmask injects a
        /// signal that arrived meanwhile (KVM checks the eventfd when an irqfd is assigned).</summary>
        public void SetMasked(bool masked)
        {
            lock (owner._lock)
            {
                if (masked == _masked)
                    return;
                if (masked)
                    owner.Vm.DeassignIrqfd(EventFd.Fd, Gsi);
                else
                    owner.Vm.AssignIrqfd(EventFd.Fd, Gsi);
                _masked = masked;
            }
        }

        public bool IsPending
        {
            get
            {
                Span<int> fds = stackalloc int[1];
                fds[0] = EventFd.Fd;
                Span<bool> ready = stackalloc bool[1];
                return Volatile.Read(ref _masked) && EventFd.Poll(fds, ready, 0) > 0 && ready[0];
            }
        }
    }
}

/// <summary>The MSI vectors of one device, remembered so that hot removal can give them back
/// (<see cref="KvmMsiController.Release"/>).</summary>
internal sealed class DeviceMsiVectors(KvmMsiController controller) : IMsiController
{
    private readonly List<IMsiVector> _vectors = [];

    public IMsiVector CreateVector(string owner, int index)
    {
        var v = controller.CreateVector(owner, index);
        lock (_vectors)
            _vectors.Add(v);
        return v;
    }

    public void Release()
    {
        lock (_vectors)
        {
            controller.Release(_vectors);
            _vectors.Clear();
        }
    }
}

/// <summary>Queue notifications as KVM ioeventfds on the MMIO bus.</summary>
internal sealed class KvmIoEventRegistrar(VmFd vm) : IIoEventRegistrar
{
    public void Register(EventFd eventFd, ulong address, uint length) => vm.AssignIoeventfd(eventFd.Fd, address, length);

    public void Unregister(EventFd eventFd, ulong address, uint length) =>
        vm.AssignIoeventfd(eventFd.Fd, address, length, deassign: true);
}
