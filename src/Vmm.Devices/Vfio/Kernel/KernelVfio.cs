namespace Vmm.Devices.Vfio.Kernel;

/// <summary>Opens planned host devices (<see cref="VfioHost.Plan"/>) through the kernel backends and owns what they
/// share: one type1 <see cref="VfioContainer"/> for every legacy group, one <see cref="Iommufd"/> IOAS for every cdev
/// device, and each <see cref="VfioGroup"/> (a group opens once, however many of its devices are used).
/// <para>KVM is reached through <c>addToKvm</c> (the machine calls <c>KvmVfioDevice.AddFile</c>): with a group fd on
/// the legacy path (once per group), with the device cdev fd on the iommufd path, before VFIO_DEVICE_BIND_IOMMUFD.</para>
/// <para>Afterwards the machine maps guest RAM into each distinct <see cref="IVfioDevice.Dma"/> (<see cref="DmaSpaces"/>)
/// with IOVA = guest physical, after <see cref="VfioHost.MemlockCheck"/>. Dispose the devices first, then this.</para></summary>
public sealed class KernelVfio(Action<int> addToKvm) : IDisposable
{
    private readonly Dictionary<int, VfioGroup> _groups = [];
    private VfioContainer? _container;
    private Iommufd? _iommufd;

    /// <summary>The DMA spaces opened so far (the container and/or the iommufd IOAS).</summary>
    public IReadOnlyList<IVfioDmaSpace> DmaSpaces =>
        new IVfioDmaSpace?[] { _container, _iommufd }.OfType<IVfioDmaSpace>().ToArray();

    public KernelVfioDevice Open(VfioHostPlan plan) => plan.Backend switch
    {
        VfioBackendKind.IommufdCdev => OpenCdev(plan),
        _ => OpenLegacy(plan),
    };

    private KernelVfioDevice OpenCdev(VfioHostPlan plan)
    {
        _iommufd ??= Iommufd.Open(plan.IommufdNode);
        using var cdev = VfioCdev.Open(plan.CdevNode ?? throw new VfioException($"{plan.Name}: the plan has no cdev node"), plan.Name);
        addToKvm(cdev.Fd);
        return cdev.Bind(_iommufd);
    }

    private KernelVfioDevice OpenLegacy(VfioHostPlan plan)
    {
        _container ??= VfioContainer.Open(plan.ContainerNode);
        if (!_groups.TryGetValue(plan.IommuGroup, out var group))
        {
            group = VfioGroup.Open(plan.GroupNode, plan.IommuGroup,
                $"see which drivers hold them: ls -l /sys/kernel/iommu_groups/{plan.IommuGroup}/devices/*/driver");
            try
            {
                _container.Attach(group);
                addToKvm(group.Fd);
            }
            catch
            {
                group.Dispose();
                throw;
            }
            _groups.Add(plan.IommuGroup, group);
        }
        return group.OpenDevice(plan.DeviceName, _container);
    }

    public void Dispose()
    {
        foreach (var g in _groups.Values)
            g.Dispose();
        _groups.Clear();
        _container?.Dispose();
        _container = null;
        _iommufd?.Dispose();
        _iommufd = null;
    }
}
