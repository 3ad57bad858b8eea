using System.Buffers.Binary;
using System.Text;
using Vmm.Interop;
using Vmm.Memory;

namespace Vmm.Devices.Virtio;

/// <summary>A disk image that cannot back a block device: it cannot be opened, is empty, is a directory, or its size is
/// not a whole number of 512-byte sectors.</summary>
public sealed class DiskImageException(string path, string message) : Exception($"{path}: {message}")
{
    /// <summary>The image path as given.</summary>
    public string Path { get; } = path;
}

/// <summary>virtio-blk (virtio 1.2 §5.2) over a raw image file or block device: one request queue served on a
/// <see cref="VirtioWorker"/> thread with positional I/O straight into guest memory (bounced through an aligned
/// buffer only for O_DIRECT with unaligned guest buffers). Every request is validated against the chain layout,
/// the capacity and the negotiated features before the image is touched; a bad request gets IOERR/UNSUPP, a chain
/// without a status byte is returned with nothing written, and the device keeps serving either way.
/// <para>Image rules: the file must exist, be non-empty and a multiple of 512 bytes (an odd tail could not be
/// addressed by the guest and silently dropping it hides a corrupt or wrong file, so it is refused). Its size is
/// read once: the capacity does not follow later resizes.</para></summary>
public sealed class VirtioBlock : VirtioDevice, IDeviceCounters
{
    public const int SectorSize = 512;
    public const int IdBytes = 20;

    // Feature bits (§5.2.3).
    public const int FeatureSizeMax = 1, FeatureSegMax = 2, FeatureRo = 5, FeatureBlkSize = 6, FeatureFlush = 9,
        FeatureDiscard = 13, FeatureWriteZeroes = 14;

    // Request types and status values (§5.2.6).
    public const uint TypeIn = 0, TypeOut = 1, TypeFlush = 4, TypeGetId = 8, TypeDiscard = 11, TypeWriteZeroes = 13;
    public const byte StatusOk = 0, StatusIoErr = 1, StatusUnsupported = 2;

    /// <summary>Data segments per request: the queue size less header and status (Linux requires seg_max to fit a
    /// direct chain; indirect tables are capped at the queue size by <see cref="SplitQueue"/> as well).</summary>
    public const uint SegMax = QueueSize - 2;
    public const uint MaxDiscardSectors = 1u << 22, MaxDiscardSegments = 32, DiscardSectorAlignment = 8;
    public const uint MaxWriteZeroesSectors = 1u << 22, MaxWriteZeroesSegments = 32;

    private const ushort QueueSize = 256;
    private const int HeaderSize = 16, SegmentSize = 16;
    private const uint SegmentFlagUnmap = 1;
    private const int ConfigBytes = 0x3C; // through write_zeroes_may_unmap + unused1 (no secure erase, no zoned)
    private const int BounceBytes = 256 * 1024;
    private const int ZeroBytes = 64 * 1024;

    private readonly string _path;
    private readonly byte[] _id = new byte[IdBytes];
    private readonly byte[] _segments = new byte[Math.Max(MaxDiscardSegments, MaxWriteZeroesSegments) * SegmentSize];
    private readonly AlignedBuffer? _bounce;
    private readonly AlignedBuffer _zeroes;
    private readonly Lock _lifecycle = new();
    private int _fd;

    /// <summary>Managed bytes the request thread allocated since activation (for the zero-allocation test).</summary>
    public long WorkerAllocatedBytes => Worker?.AllocatedBytes ?? 0;
    private VirtioContext? _context;
    private bool _writeThrough;
    private long _ioErrors;

    /// <summary>Opens <paramref name="path"/> (a raw image or block device) with O_CLOEXEC, O_RDONLY or O_RDWR and,
    /// when <paramref name="direct"/>, O_DIRECT. <paramref name="serial"/> (printable ASCII, at most 20 bytes) answers
    /// GET_ID; without one the ID is "vmm" and 17 hex digits of SHA-256 of the full path, stable across runs.</summary>
    /// <exception cref="DiskImageException">The image cannot be opened or sized, is empty, or is not a multiple of 512 bytes.</exception>
    public VirtioBlock(string path, bool readOnly = false, bool direct = false, string? serial = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (serial is not null && (serial.Length > IdBytes || serial.Any(c => c is < ' ' or > '~')))
            throw new ArgumentException($"serial \"{serial}\" is not printable ASCII of at most {IdBytes} bytes", nameof(serial));
        if (Directory.Exists(path))
            throw new DiskImageException(path, "is a directory");
        _path = path;
        ReadOnly = readOnly;
        Direct = direct;
        // O_NONBLOCK: a FIFO given as a disk must not hang the open; it is refused just below.
        int flags = Sys.O_CLOEXEC | Tmds.Linux.LibC.O_NONBLOCK | (readOnly ? Sys.O_RDONLY : Sys.O_RDWR) | (direct ? FileIo.O_DIRECT : 0);
        int fd = FileIo.Open(path, flags);
        if (fd < 0)
            throw new DiskImageException(path, $"cannot open{(readOnly ? " read-only" : " read-write")}{(direct ? " with O_DIRECT" : "")}: {Errno.Describe(-fd)}");
        try
        {
            if (HostFile.NotAnImage(fd) is string notAnImage)
                throw new DiskImageException(path, notAnImage);
            // QEMU's image locks (writers exclude everyone, readers share with readers); held until the fd closes.
            if (ImageLock.TryLock(fd, writable: !readOnly) is string locked)
                throw new DiskImageException(path, locked);
            long size = FileIo.Size(fd);
            if (size < 0)
                throw new DiskImageException(path, $"cannot find the size: {Errno.Describe((int)-size)}");
            if (size == 0)
                throw new DiskImageException(path, "is empty");
            if (size % SectorSize != 0)
                throw new DiskImageException(path, $"is {size} bytes, not a multiple of {SectorSize} (pad or truncate it)");
            Capacity = (ulong)size / SectorSize;
            _zeroes = new AlignedBuffer(ZeroBytes);
            _bounce = direct ? new AlignedBuffer(BounceBytes) : null;
        }
        catch
        {
            Sys.Close(fd);
            throw;
        }
        _fd = fd;
        string id = serial ?? $"vmm-{Fnv1a64(Encoding.UTF8.GetBytes(Path.GetFullPath(path))):x16}"; // all 20 bytes
        Encoding.ASCII.GetBytes(id, _id); // NUL-padded; exactly 20 bytes has no terminator (§5.2.6)
    }

    /// <summary>Disk size in 512-byte sectors.</summary>
    public ulong Capacity { get; }

    public bool ReadOnly { get; }

    public bool Direct { get; }

    /// <summary>Requests answered with IOERR because the host I/O failed (not because the request was invalid).</summary>
    public long IoErrors => Interlocked.Read(ref _ioErrors);

    public override VirtioDeviceType Type => VirtioDeviceType.Block;

    public override string Name => $"virtio-blk ({System.IO.Path.GetFileName(_path)})";

    public override (byte Class, byte SubClass) PciClass => (0x01, 0x00); // mass storage, as QEMU

    public override ulong DeviceFeatures
    {
        get
        {
            // No SIZE_MAX: segments of any length are served (straight into guest memory, or in bounce-sized pieces).
            ulong f = (1UL << FeatureSegMax) | (1UL << FeatureBlkSize) | (1UL << FeatureFlush);
            f |= ReadOnly ? 1UL << FeatureRo : (1UL << FeatureDiscard) | (1UL << FeatureWriteZeroes);
            return f;
        }
    }

    public override int QueueCount => 1;

    public override ushort MaxQueueSize => QueueSize;

    public override int ConfigSize => ConfigBytes;

    /// <summary>struct virtio_blk_config (§5.2.4).</summary>
    public override void ReadConfig(int offset, Span<byte> data)
    {
        Span<byte> c = stackalloc byte[ConfigBytes];
        c.Clear();
        BinaryPrimitives.WriteUInt64LittleEndian(c[0x00..], Capacity);
        BinaryPrimitives.WriteUInt32LittleEndian(c[0x0C..], SegMax);         // seg_max
        BinaryPrimitives.WriteUInt32LittleEndian(c[0x14..], SectorSize);     // blk_size
        BinaryPrimitives.WriteUInt16LittleEndian(c[0x22..], 1);              // num_queues (meaningful with MQ only)
        if (!ReadOnly)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x24..], MaxDiscardSectors);
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x28..], MaxDiscardSegments);
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x2C..], DiscardSectorAlignment);
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x30..], MaxWriteZeroesSectors);
            BinaryPrimitives.WriteUInt32LittleEndian(c[0x34..], MaxWriteZeroesSegments);
            c[0x38] = 1; // write_zeroes_may_unmap: with the unmap flag we punch a hole
        }
        c.Slice(offset, data.Length).CopyTo(data);
    }

    public override void Activate(VirtioContext context)
    {
        lock (_lifecycle)
        {
            if (Worker is not null)
                throw new InvalidOperationException($"{Name} is already active");
            ObjectDisposedException.ThrowIf(_fd < 0, this);
            _context = context;
            // Without FLUSH the driver assumes a write-through cache: a write is durable when it completes (§5.2.6.2).
            _writeThrough = !context.Negotiated(FeatureFlush) && !ReadOnly;
            Worker = new VirtioWorker($"virtio-blk {System.IO.Path.GetFileName(_path)}", context.Kicks, ServeQueue);
        }
    }

    public override void Deactivate()
    {
        lock (_lifecycle)
        {
            Worker?.Dispose();
            Worker = null;
            _context = null;
        }
    }

    public override void Dispose()
    {
        Deactivate();
        lock (_lifecycle)
        {
            if (_fd >= 0)
                ImageLock.Unlock(_fd); // at once, even if a forked child still shares the open file
            Sys.Close(_fd);
            _fd = -1;
            _bounce?.Dispose();
            _zeroes.Dispose();
        }
        base.Dispose();
    }

    // Cached: a method group converted per call would allocate a delegate on every kick.
    private ChainHandler? _handler;

    private void ServeQueue(int index) => _context!.ServeQueue(index, _handler ??= Process);

    /// <summary>Serves one request; returns the bytes written into device-writable buffers.</summary>
    private uint Process(GuestMemory memory, DescriptorChain chain)
    {
        var readable = chain.Readable;
        var writable = chain.Writable;
        ulong readableBytes = Total(readable), writableBytes = Total(writable);
        // The status byte is the last byte of the chain (§5.2.6); with no writable byte there is none to report in.
        if (writableBytes == 0 || !TryLastByte(memory, writable, out var statusAddress))
            return 0;
        byte status;
        uint used = 1;
        if (readableBytes < HeaderSize)
            status = StatusIoErr; // the header must be device-readable
        else
        {
            Span<byte> header = stackalloc byte[HeaderSize];
            if (!Gather(memory, readable, 0, header))
                status = StatusIoErr;
            else
            {
                uint type = BinaryPrimitives.ReadUInt32LittleEndian(header);
                ulong sector = BinaryPrimitives.ReadUInt64LittleEndian(header[8..]);
                ulong dataOut = readableBytes - HeaderSize, dataIn = writableBytes - 1;
                status = type switch
                {
                    TypeIn => Read(memory, writable, sector, dataOut, dataIn),
                    TypeOut => Write(memory, readable, sector, dataOut, dataIn),
                    TypeFlush => Flush(dataOut, dataIn),
                    TypeGetId => GetId(memory, writable, dataOut, dataIn, out used),
                    TypeDiscard or TypeWriteZeroes => DiscardOrZero(memory, readable, type == TypeDiscard, dataOut, dataIn),
                    _ => StatusUnsupported,
                };
                if (type == TypeIn && status == StatusOk)
                {
                    used = (uint)dataIn + 1;
                    _readBytes += (long)dataIn;
                    _readOps++;
                }
                else if (type == TypeOut && status == StatusOk)
                {
                    _writeBytes += (long)dataOut;
                    _writeOps++;
                }
            }
        }
        if (!memory.TryGetSpan(statusAddress, 1, out var statusByte))
            return 0;
        statusByte[0] = status;
        return used;
    }

    // Written by the worker thread only; read by vm.counters.
    private long _readBytes, _readOps, _writeBytes, _writeOps;

    /// <summary>vm.counters, in Cloud Hypervisor's names: completed reads and writes.</summary>
    public IReadOnlyList<KeyValuePair<string, ulong>> Counters() =>
    [
        new("read_bytes", (ulong)Volatile.Read(ref _readBytes)),
        new("read_ops", (ulong)Volatile.Read(ref _readOps)),
        new("write_bytes", (ulong)Volatile.Read(ref _writeBytes)),
        new("write_ops", (ulong)Volatile.Read(ref _writeOps)),
    ];

    private bool InRange(ulong sector, ulong sectors) => sector <= Capacity && sectors <= Capacity - sector;

    private byte Read(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> writable, ulong sector, ulong dataOut, ulong dataIn)
    {
        if (dataOut != 0 || dataIn % SectorSize != 0 || !InRange(sector, dataIn / SectorSize))
            return StatusIoErr;
        long position = (long)(sector * SectorSize);
        if (_bounce is not null && !Aligned(writable, 0, dataIn))
        {
            var bounce = _bounce.Span;
            for (ulong done = 0; done < dataIn;)
            {
                int n = (int)Math.Min((ulong)bounce.Length, dataIn - done);
                if (!ReadFully(bounce[..n], position + (long)done) || !Scatter(memory, writable, done, bounce[..n]))
                    return IoError();
                done += (ulong)n;
            }
            return StatusOk;
        }
        var pieces = new Pieces(writable, 0, dataIn);
        while (pieces.Next(out ulong address, out int length))
        {
            if (!memory.TryGetSpan(new GuestAddress(address), length, out var span) || !ReadFully(span, position))
                return IoError();
            position += length;
        }
        return StatusOk;
    }

    private byte Write(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> readable, ulong sector, ulong dataOut, ulong dataIn)
    {
        if (ReadOnly || dataIn != 0 || dataOut % SectorSize != 0 || !InRange(sector, dataOut / SectorSize))
            return StatusIoErr;
        long position = (long)(sector * SectorSize);
        if (_bounce is not null && !Aligned(readable, HeaderSize, dataOut))
        {
            var bounce = _bounce.Span;
            for (ulong done = 0; done < dataOut;)
            {
                int n = (int)Math.Min((ulong)bounce.Length, dataOut - done);
                if (!Gather(memory, readable, HeaderSize + done, bounce[..n]) || !WriteFully(bounce[..n], position + (long)done))
                    return IoError();
                done += (ulong)n;
            }
        }
        else
        {
            var pieces = new Pieces(readable, HeaderSize, dataOut);
            while (pieces.Next(out ulong address, out int length))
            {
                if (!memory.TryGetSpan(new GuestAddress(address), length, out var span) || !WriteFully(span, position))
                    return IoError();
                position += length;
            }
        }
        return SyncIfWriteThrough();
    }

    private byte Flush(ulong dataOut, ulong dataIn)
    {
        if (dataOut != 0 || dataIn != 0)
            return StatusIoErr;
        if (ReadOnly)
            return StatusOk; // nothing of ours to make durable
        return FileIo.DataSync(_fd) == 0 ? StatusOk : IoError();
    }

    private byte GetId(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> writable, ulong dataOut, ulong dataIn, out uint used)
    {
        used = 1;
        if (dataOut != 0)
            return StatusIoErr;
        int n = (int)Math.Min(dataIn, IdBytes);
        if (!Scatter(memory, writable, 0, _id.AsSpan(0, n)))
            return StatusIoErr;
        used = (uint)n + 1;
        return StatusOk;
    }

    private byte DiscardOrZero(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> readable, bool discard, ulong dataOut, ulong dataIn)
    {
        if (ReadOnly)
            return StatusIoErr;
        if (!_context!.Negotiated(discard ? FeatureDiscard : FeatureWriteZeroes))
            return StatusUnsupported;
        uint maxSegments = discard ? MaxDiscardSegments : MaxWriteZeroesSegments;
        uint maxSectors = discard ? MaxDiscardSectors : MaxWriteZeroesSectors;
        if (dataIn != 0 || dataOut == 0 || dataOut % SegmentSize != 0 || dataOut / SegmentSize > maxSegments)
            return StatusIoErr;
        // One snapshot of all segments, all checked before any is carried out.
        var segments = _segments.AsSpan(0, (int)dataOut);
        if (!Gather(memory, readable, HeaderSize, segments))
            return StatusIoErr;
        for (int i = 0; i < segments.Length; i += SegmentSize)
        {
            ulong sector = BinaryPrimitives.ReadUInt64LittleEndian(segments[i..]);
            uint sectors = BinaryPrimitives.ReadUInt32LittleEndian(segments[(i + 8)..]);
            uint flags = BinaryPrimitives.ReadUInt32LittleEndian(segments[(i + 12)..]);
            // Unknown flags, or unmap on a discard: UNSUPP (§5.2.6.2).
            if ((flags & ~SegmentFlagUnmap) != 0 || (discard && flags != 0))
                return StatusUnsupported;
            if (sectors > maxSectors || !InRange(sector, sectors))
                return StatusIoErr;
        }
        for (int i = 0; i < segments.Length; i += SegmentSize)
        {
            long offset = (long)(BinaryPrimitives.ReadUInt64LittleEndian(segments[i..]) * SectorSize);
            long length = (long)BinaryPrimitives.ReadUInt32LittleEndian(segments[(i + 8)..]) * SectorSize;
            bool unmap = (BinaryPrimitives.ReadUInt32LittleEndian(segments[(i + 12)..]) & SegmentFlagUnmap) != 0;
            if (length == 0)
                continue;
            if (discard)
            {
                // Discard is a hint: a file system that cannot punch holes has done its part by refusing.
                int r = FileIo.Fallocate(_fd, FileIo.FALLOC_FL_PUNCH_HOLE | FileIo.FALLOC_FL_KEEP_SIZE, offset, length);
                if (r != 0 && r != -Errno.EOPNOTSUPP)
                    return IoError();
            }
            else if (!WriteZeroes(offset, length, unmap))
                return IoError();
        }
        return SyncIfWriteThrough();
    }

    /// <summary>Makes [offset, offset+length) read as zeroes: a punched hole when the driver allows unmapping, else a
    /// zeroed range, else (a file system that supports neither) written zeroes.</summary>
    private bool WriteZeroes(long offset, long length, bool unmap)
    {
        if (unmap && FileIo.Fallocate(_fd, FileIo.FALLOC_FL_PUNCH_HOLE | FileIo.FALLOC_FL_KEEP_SIZE, offset, length) == 0)
            return true;
        int r = FileIo.Fallocate(_fd, FileIo.FALLOC_FL_ZERO_RANGE | FileIo.FALLOC_FL_KEEP_SIZE, offset, length);
        if (r == 0)
            return true;
        if (r != -Errno.EOPNOTSUPP && r != -Errno.EINVAL && r != -Errno.ENOSYS)
            return false;
        var zeroes = _zeroes.Span;
        for (long done = 0; done < length;)
        {
            int n = (int)Math.Min(zeroes.Length, length - done);
            if (!WriteFully(zeroes[..n], offset + done))
                return false;
            done += n;
        }
        return true;
    }

    private byte SyncIfWriteThrough() => !_writeThrough || FileIo.DataSync(_fd) == 0 ? StatusOk : IoError();

    private byte IoError()
    {
        Interlocked.Increment(ref _ioErrors);
        return StatusIoErr;
    }

    /// <summary>Reads exactly buffer.Length bytes; false on an error or an end of file (the image shrank).</summary>
    private bool ReadFully(Span<byte> buffer, long position)
    {
        while (!buffer.IsEmpty)
        {
            long n = FileIo.ReadAt(_fd, buffer, position);
            if (n <= 0)
                return false;
            buffer = buffer[(int)n..];
            position += n;
        }
        return true;
    }

    /// <summary>Writes all of <paramref name="buffer"/>, going on after short writes; false on an error.</summary>
    private bool WriteFully(ReadOnlySpan<byte> buffer, long position)
    {
        while (!buffer.IsEmpty)
        {
            long n = FileIo.WriteAt(_fd, buffer, position);
            if (n <= 0)
                return false;
            buffer = buffer[(int)n..];
            position += n;
        }
        return true;
    }

    private static ulong Total(ReadOnlySpan<VirtqDescriptor> buffers)
    {
        ulong total = 0;
        foreach (var b in buffers)
            total += b.Length;
        return total;
    }

    private static bool TryLastByte(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> writable, out GuestAddress address)
    {
        for (int i = writable.Length - 1; i >= 0; i--)
        {
            if (writable[i].Length != 0)
            {
                address = new GuestAddress(writable[i].Address + writable[i].Length - 1);
                return memory.IsValidRange(address, 1);
            }
        }
        address = default;
        return false;
    }

    /// <summary>O_DIRECT needs 512-aligned memory and lengths. Guest RAM regions are page-aligned both in the guest and
    /// in the host mapping, so the guest address's alignment is the host pointer's.</summary>
    private static bool Aligned(ReadOnlySpan<VirtqDescriptor> buffers, ulong start, ulong length)
    {
        var pieces = new Pieces(buffers, start, length);
        while (pieces.Next(out ulong address, out int n))
        {
            if (address % SectorSize != 0 || n % SectorSize != 0)
                return false;
        }
        return true;
    }

    /// <summary>Copies bytes [start, start+destination.Length) of the buffers' concatenation out of guest memory.</summary>
    private static bool Gather(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> buffers, ulong start, Span<byte> destination)
    {
        var pieces = new Pieces(buffers, start, (ulong)destination.Length);
        while (pieces.Next(out ulong address, out int length))
        {
            if (!memory.TryGetSpan(new GuestAddress(address), length, out var span))
                return false;
            span.CopyTo(destination);
            destination = destination[length..];
        }
        return destination.IsEmpty;
    }

    /// <summary>Copies <paramref name="source"/> into bytes [start, ...) of the buffers' concatenation.</summary>
    private static bool Scatter(GuestMemory memory, ReadOnlySpan<VirtqDescriptor> buffers, ulong start, ReadOnlySpan<byte> source)
    {
        var pieces = new Pieces(buffers, start, (ulong)source.Length);
        while (pieces.Next(out ulong address, out int length))
        {
            if (!memory.TryGetSpan(new GuestAddress(address), length, out var span))
                return false;
            source[..length].CopyTo(span);
            source = source[length..];
        }
        return source.IsEmpty;
    }

    /// <summary>Walks the pieces of bytes [start, start+length) of a list of buffers read as one byte stream: a request
    /// may be framed any way the driver likes (§2.6.4), e.g. header and data in one buffer.</summary>
    private ref struct Pieces(ReadOnlySpan<VirtqDescriptor> buffers, ulong start, ulong length)
    {
        private readonly ReadOnlySpan<VirtqDescriptor> _buffers = buffers;
        private int _index;
        private ulong _skip = start;
        private ulong _left = length;

        public bool Next(out ulong address, out int length)
        {
            while (_left > 0 && _index < _buffers.Length)
            {
                var b = _buffers[_index++];
                if (_skip >= b.Length)
                {
                    _skip -= b.Length;
                    continue;
                }
                ulong n = Math.Min(b.Length - _skip, _left);
                address = b.Address + _skip;
                length = (int)n; // a buffer is at most int.MaxValue bytes (SplitQueue checks)
                _skip = 0;
                _left -= n;
                return true;
            }
            address = 0;
            length = 0;
            return false;
        }
    }

    /// <summary>FNV-1a, 64-bit: a stable default serial from the path (no cryptographic strength needed, and no
    /// OpenSSL, which .NET's hash classes load on Linux).</summary>
    private static ulong Fnv1a64(ReadOnlySpan<byte> data)
    {
        ulong h = 0xCBF29CE484222325;
        foreach (byte b in data)
            h = (h ^ b) * 0x100000001B3;
        return h;
    }
}
