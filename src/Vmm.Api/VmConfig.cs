using System.Text.Json;
using System.Text.Json.Serialization;

namespace Vmm.Api;

// Cloud Hypervisor's VmConfig (vmm/src/api/openapi/cloud-hypervisor.yaml), the one configuration model of vmm: the
// body of vm.create, the file of `vmm run --config`, what the command-line flags build, and what vm.info returns.
// Property names are CH's (snake_case). Every property of CH's schema is here so that a client sending CH's defaults
// (Kata's generated client sends all of them) is accepted; what vmm does not implement must keep its default value
// (VmConfigMapper says which and why). A property outside the schema is an error (UnmappedMemberHandling).

public sealed class VmConfig
{
    public CpusConfig? Cpus { get; set; }
    public MemoryConfig? Memory { get; set; }
    [JsonRequired]
    public PayloadConfig? Payload { get; set; }
    public JsonElement? RateLimitGroups { get; set; }
    public List<DiskConfig>? Disks { get; set; }
    public List<NetConfig>? Net { get; set; }
    public RngConfig? Rng { get; set; }
    public JsonElement? Balloon { get; set; }
    public List<FsConfig>? Fs { get; set; }
    public JsonElement? GenericVhostUser { get; set; }
    public JsonElement? Pmem { get; set; }
    public ConsoleConfig? Serial { get; set; }
    public ConsoleConfig? Console { get; set; }
    public JsonElement? DebugConsole { get; set; }
    public List<DeviceConfig>? Devices { get; set; }
    public List<UserDeviceConfig>? UserDevices { get; set; }
    public JsonElement? Vdpa { get; set; }
    public VsockConfig? Vsock { get; set; }
    public JsonElement? Numa { get; set; }
    public bool? Iommu { get; set; }
    public bool? Watchdog { get; set; }
    public JsonElement? Rtc { get; set; }
    public bool? Pvpanic { get; set; }
    public List<PciSegmentConfig>? PciSegments { get; set; }
    public PlatformConfig? Platform { get; set; }
    public JsonElement? Tpm { get; set; }
    public bool? LandlockEnable { get; set; }
    public JsonElement? LandlockRules { get; set; }

    /// <summary>The ids of the devices that are plugged and removed by id (null for one not named yet): disks,
    /// interfaces, VFIO and vfio-user devices, file systems, the vsock device. Id generation, the uniqueness check and
    /// vm.remove-device all read this one list, so a new kind of device is added here once.</summary>
    public IEnumerable<string?> PluggableDeviceIds() =>
        (Disks ?? []).Select(d => d.Id).Concat((Net ?? []).Select(n => n.Id)).Concat((Devices ?? []).Select(d => d.Id))
            .Concat((UserDevices ?? []).Select(d => d.Id)).Concat((Fs ?? []).Select(f => f.Id)).Append(Vsock?.Id);

    /// <summary>Takes device <paramref name="id"/> out of the config; false when no pluggable device has that id.</summary>
    public bool RemoveDevice(string id)
    {
        int removed = (Disks?.RemoveAll(d => d.Id == id) ?? 0) + (Net?.RemoveAll(n => n.Id == id) ?? 0)
            + (Devices?.RemoveAll(d => d.Id == id) ?? 0) + (UserDevices?.RemoveAll(d => d.Id == id) ?? 0)
            + (Fs?.RemoveAll(f => f.Id == id) ?? 0);
        if (Vsock?.Id == id)
        {
            Vsock = null;
            removed++;
        }
        return removed > 0;
    }
}

public sealed class PayloadConfig
{
    public string? Firmware { get; set; }
    public string? Kernel { get; set; }
    public string? Cmdline { get; set; }
    public string? Initramfs { get; set; }
    public string? Igvm { get; set; }
    public string? HostData { get; set; }
}

public sealed class CpusConfig
{
    [JsonRequired]
    public int BootVcpus { get; set; } = 1;
    [JsonRequired]
    public int MaxVcpus { get; set; } = 1;
    public JsonElement? Topology { get; set; }
    public bool? KvmHyperv { get; set; }
    public int? MaxPhysBits { get; set; }
    public bool? Nested { get; set; }
    public JsonElement? Affinity { get; set; }
    public JsonElement? Features { get; set; }
    public JsonElement? CoreScheduling { get; set; }
}

public sealed class MemoryConfig
{
    [JsonRequired]
    public long Size { get; set; }
    public long? HotplugSize { get; set; }
    public long? HotpluggedSize { get; set; }
    public bool? Mergeable { get; set; }
    public string? HotplugMethod { get; set; }
    public bool? Shared { get; set; }
    public bool? Hugepages { get; set; }
    public long? HugepageSize { get; set; }
    public bool? Prefault { get; set; }
    public bool? Reserve { get; set; }
    public bool? Thp { get; set; }
    public JsonElement? Zones { get; set; }
}

public sealed class DiskConfig
{
    public string? Path { get; set; }
    public bool? Readonly { get; set; }
    public bool? Direct { get; set; }
    public bool? Iommu { get; set; }
    public int? NumQueues { get; set; }
    public int? QueueSize { get; set; }
    public bool? VhostUser { get; set; }
    public string? VhostSocket { get; set; }
    public JsonElement? RateLimiterConfig { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
    public string? Id { get; set; }
    public string? Serial { get; set; }
    public string? RateLimitGroup { get; set; }
    public JsonElement? QueueAffinity { get; set; }
    public bool? BackingFiles { get; set; }
    public bool? Sparse { get; set; }
    public string? ImageType { get; set; }
    public string? LockGranularity { get; set; }
}

/// <summary>CH's FsConfig: a virtio-fs device served by the vhost-user back-end (virtiofsd) at socket;
/// num_queues counts the request queues.</summary>
public sealed class FsConfig
{
    [JsonRequired]
    public string? Tag { get; set; }
    [JsonRequired]
    public string? Socket { get; set; }
    public int? NumQueues { get; set; }
    public int? QueueSize { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
    public string? Id { get; set; }
}

public sealed class NetConfig
{
    public string? Tap { get; set; }
    public string? Ip { get; set; }
    public string? Mask { get; set; }
    public string? Mac { get; set; }
    public string? HostMac { get; set; }
    public int? Mtu { get; set; }
    public bool? Iommu { get; set; }
    public int? NumQueues { get; set; }
    public int? QueueSize { get; set; }
    public bool? VhostUser { get; set; }
    public string? VhostSocket { get; set; }
    public string? VhostMode { get; set; }
    public string? Id { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
    public JsonElement? RateLimiterConfig { get; set; }
    public bool? OffloadTso { get; set; }
    public bool? OffloadUfo { get; set; }
    public bool? OffloadCsum { get; set; }
}

public sealed class RngConfig
{
    [JsonRequired]
    public string? Src { get; set; }
    public string? Id { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
    public bool? Iommu { get; set; }
}

/// <summary>CH's VsockConfig: the guest's cid and the host socket of the hybrid vsock.</summary>
public sealed class VsockConfig
{
    [JsonRequired]
    public long Cid { get; set; }
    [JsonRequired]
    public string? Socket { get; set; }
    public bool? Iommu { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
    public string? Id { get; set; }
}

/// <summary>CH's ConsoleConfig (also its SerialConfig: the same shape). Mode: Off, Pty, Tty, File, Socket, Null.</summary>
public sealed class ConsoleConfig
{
    public string? File { get; set; }
    public string? Socket { get; set; }
    [JsonRequired]
    public string Mode { get; set; } = "Null";
    public bool? Iommu { get; set; }
    public string? Id { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
}

public sealed class DeviceConfig
{
    public string? Path { get; set; }
    public bool? Iommu { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
    public string? Id { get; set; }
    public int? XNvGpudirectClique { get; set; }
    public JsonElement? XExcludeMmapBars { get; set; }
}

public sealed class UserDeviceConfig
{
    [JsonRequired]
    public string? Socket { get; set; }
    public string? Id { get; set; }
    public int? PciSegment { get; set; }
    public int? PciDeviceId { get; set; }
}

/// <summary>CH's PciSegmentConfig: vmm has one segment (0); its mmio64_aperture_weight sizes the 64-bit window.</summary>
public sealed class PciSegmentConfig
{
    [JsonRequired]
    public int PciSegment { get; set; }
    public int? Mmio32ApertureWeight { get; set; }
    public int? Mmio64ApertureWeight { get; set; }
}

public sealed class PlatformConfig
{
    public int? NumPciSegments { get; set; }
    public JsonElement? IommuSegments { get; set; }
    public int? IommuAddressWidthBits { get; set; }
    public string? SystemSerialNumber { get; set; }
    public string? SerialNumber { get; set; }
    public string? SystemUuid { get; set; }
    public string? Uuid { get; set; }
    public JsonElement? OemStrings { get; set; }
    public string? SystemManufacturer { get; set; }
    public string? SystemProductName { get; set; }
    public string? SystemVersion { get; set; }
    public string? SystemFamily { get; set; }
    public string? SystemSkuNumber { get; set; }
    public string? ChassisAssetTag { get; set; }
    public bool? Tdx { get; set; }
    public bool? SevSnp { get; set; }
    public bool? Iommufd { get; set; }
    /// <summary>Peer-to-peer DMA between passed-through devices (CH's default: true).</summary>
    public bool? VfioP2pDma { get; set; }
}

// ------------------------------------------------------------------------------------------------ responses

public sealed class VmmPingResponse
{
    public string BuildVersion { get; set; } = "";
    public string Version { get; set; } = "";
    public long Pid { get; set; }
    public List<string> Features { get; set; } = [];
}

public sealed class VmInfo
{
    public required VmConfig Config { get; set; }
    public required string State { get; set; }
    public long MemoryActualSize { get; set; }
    public Dictionary<string, DeviceNode>? DeviceTree { get; set; }
}

public sealed class DeviceNode
{
    public string? Id { get; set; }
    public List<JsonElement> Resources { get; set; } = [];
    public List<string> Children { get; set; } = [];
    public string? PciBdf { get; set; }
}

/// <summary>vm.remove-device's body.</summary>
public sealed class VmRemoveDevice
{
    [JsonRequired]
    public string? Id { get; set; }
}

public sealed class PciDeviceInfoResponse
{
    public required string Id { get; set; }
    public required string Bdf { get; set; }
}

/// <summary>Source-generated (de)serialization: no reflection, so NativeAOT trims nothing it needs. Unknown properties
/// are errors; nulls are left out of responses (CH's skip_serializing_none).</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    AllowTrailingCommas = false,
    ReadCommentHandling = JsonCommentHandling.Disallow)]
[JsonSerializable(typeof(VmConfig))]
[JsonSerializable(typeof(VmmPingResponse))]
[JsonSerializable(typeof(VmInfo))]
[JsonSerializable(typeof(PciDeviceInfoResponse))]
[JsonSerializable(typeof(DiskConfig))]
[JsonSerializable(typeof(NetConfig))]
[JsonSerializable(typeof(DeviceConfig))]
[JsonSerializable(typeof(UserDeviceConfig))]
[JsonSerializable(typeof(VmRemoveDevice))]
[JsonSerializable(typeof(Dictionary<string, Dictionary<string, ulong>>))]
[JsonSerializable(typeof(List<string>))]
public sealed partial class ApiJsonContext : JsonSerializerContext;
