using System.Diagnostics;
using Vmm.Devices.Virtio;
using Vmm.Devices.Virtio.Net;
using Vmm.Devices.Virtio.Vsock;
using Vmm.Interop;
using Vmm.Memory;
using Vmm.Tests.TestKit;

namespace Vmm.Fuzz;

/// <summary>One virtio device's request parser, driven as the transport drives it: the device is activated on 1 MiB
/// of guest RAM, the fuzzed queue is kicked, and its worker thread serves what the guest published.
/// Input: [flags: bit 0 INDIRECT_DESC, bit 1 EVENT_IDX, bit 2 the device's own feature bits] [n: chains published,
/// mod 17] [descriptor table: 16 × 16 bytes at 0x1000] [n available-ring heads at 0x2000] [the rest: request data
/// at 0x4000]. Invariants: every published chain completes (malformed ones with 0 bytes) or the ring is reported
/// broken (NeedsReset) within 2 s, and the worker never stops on an exception. Guest memory accesses are
/// bounds-checked by GuestMemory; one outside RAM would surface as a worker fault.</summary>
public sealed class VirtioDeviceTarget : IFuzzTarget
{
    public enum Kind { Block, Net, Console, Vsock, Rng }

    private const ushort QueueSize = 16;
    private const ulong RamSize = 1 << 20, Desc = 0x1000, Avail = 0x2000, Used = 0x3000, Data = 0x4000;
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(2);

    private readonly GuestMemory _memory = GuestMemory.Create(RamSize);
    private readonly VirtioDevice _device;
    private readonly int _queue;
    private readonly string? _file;

    public VirtioDeviceTarget(Kind kind)
    {
        string tmp = Path.Combine(Path.GetTempPath(), $"vmm-fuzz-{kind.ToString().ToLowerInvariant()}-{Environment.ProcessId}");
        switch (kind)
        {
            case Kind.Block:
                _file = tmp + ".img";
                using (var f = File.Create(_file))
                    f.SetLength(1 << 20);
                _device = new VirtioBlock(_file);
                _queue = 0;
                break;
            case Kind.Net:
                _device = new VirtioNet(NetNamespace.Run(() => new TapDevice("vmmfuzz0")), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
                _queue = VirtioNet.TransmitQueue;
                break;
            case Kind.Console:
                _device = new VirtioConsole(null);
                _queue = VirtioConsole.TransmitQueue;
                break;
            case Kind.Vsock:
                _file = tmp + ".sock";
                _device = new VirtioVsock(3, _file);
                _queue = VirtioVsock.TxQueue;
                break;
            default:
                _device = new VirtioRng();
                _queue = 0;
                break;
        }
    }

    public void Run(ReadOnlySpan<byte> input)
    {
        var r = new FuzzReader(input);
        _memory.Clear(new GuestAddress(0), RamSize);
        byte flags = r.U8();
        int n = r.U8() % (QueueSize + 1);
        _memory.Write(new GuestAddress(Desc), r.Bytes(16 * QueueSize));
        _memory.Write(new GuestAddress(Avail + 4), r.Bytes(2 * n));
        _memory.WriteObj(new GuestAddress(Avail + 2), (ushort)n);
        _memory.Write(new GuestAddress(Data), r.Bytes((int)(RamSize - Data)));

        ulong features = 1UL << VirtioFeatures.Version1;
        if ((flags & 1) != 0)
            features |= 1UL << VirtioFeatures.RingIndirectDesc;
        if ((flags & 2) != 0)
            features |= 1UL << VirtioFeatures.RingEventIdx;
        if ((flags & 4) != 0)
            features |= _device.DeviceFeatures;

        var queues = new SplitQueue[_device.QueueCount];
        var kicks = new EventFd[_device.QueueCount];
        for (int i = 0; i < queues.Length; i++)
        {
            kicks[i] = new EventFd();
            // Only the fuzzed queue is live; the others stay disabled (their pops find nothing).
            queues[i] = new SplitQueue(_memory, QueueSize);
            if (i == _queue)
            {
                queues[i].DescriptorTable = Desc;
                queues[i].AvailRing = Avail;
                queues[i].UsedRing = Used;
                queues[i].Size = QueueSize;
                queues[i].IndirectDescriptors = (flags & 1) != 0;
                queues[i].EventIdx = (flags & 2) != 0;
                queues[i].Enabled = true;
            }
        }
        var interrupts = new RecordingVirtioInterrupts();
        try
        {
            _device.Activate(new VirtioContext(_memory, features, queues, kicks, interrupts));
            Exception? fault = null;
            bool done = false;
            try
            {
                kicks[_queue].Signal();
                var start = Stopwatch.StartNew();
                while (true)
                {
                    Interlocked.MemoryBarrier();
                    fault = _device.WorkerFault;
                    if (fault is not null)
                        break;
                    if (_memory.ReadObj<ushort>(new GuestAddress(Used + 2)) == n || !interrupts.NeedsResetReasons.IsEmpty)
                    {
                        done = true;
                        break;
                    }
                    if (start.Elapsed > Deadline)
                        break;
                    Thread.Yield();
                }
                fault ??= _device.WorkerFault;
            }
            finally
            {
                _device.Deactivate();
            }
            if (fault is not null)
                throw new FuzzInvariantException($"{_device.Name}: the worker stopped on {fault.GetType().Name}: {fault.Message}", fault);
            if (!done)
                throw new FuzzInvariantException($"{_device.Name}: {n} published chains not completed within {Deadline.TotalSeconds} s " +
                    $"(used index {_memory.ReadObj<ushort>(new GuestAddress(Used + 2))})");
        }
        finally
        {
            foreach (var k in kicks)
                k.Dispose();
        }
    }

    public void Dispose()
    {
        _device.Dispose();
        _memory.Dispose();
        if (_file is not null)
            File.Delete(_file);
    }
}
