using System.Diagnostics;
using System.Globalization;
using Vmm.Devices.Virtio;
using Vmm.Interop;
using Vmm.Tests.TestKit;

namespace Vmm.Tests.Devices.Virtio;

/// <summary>vmm's image locks against the real QEMU (Debian's qemu-system-x86_64, which the nested-KVM harness needs
/// anyway): each refuses the other in both orders exactly where QEMU refuses itself (share-rw=off), readers share,
/// and the error names QEMU's pid and command. QEMU runs stopped (-S) with the image on a virtio-blk device, so it
/// holds the locks a running guest's disk holds and needs no kernel.</summary>
public sealed class ImageLockQemuTests : IDisposable
{
    private const string QemuComm = "qemu-system-x86"; // /proc/PID/comm keeps 15 bytes
    private readonly string _dir = Directory.CreateTempSubdirectory("vmm-lock-").FullName;
    private readonly string _image;

    public ImageLockQemuTests()
    {
        _image = Path.Combine(_dir, "disk.img");
        File.WriteAllBytes(_image, new byte[1 << 20]);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void A_running_QEMU_writer_keeps_vmm_out_and_vmm_names_it()
    {
        using var qemu = Qemu.Start(_image, readOnly: false);
        Assert.Equal(["100-101", "201-201"], LockedRanges(_image)); // QEMU's layout, as this test relies on it
        Assert.Equal($"{_image}: is locked for writing by pid {qemu.Pid} ({QemuComm}): another VM (or QEMU) uses this image; " +
            "two VMs must not write one image", Assert.Throws<DiskImageException>(() => new VirtioBlock(_image)).Message);
        Assert.Equal($"{_image}: is locked for writing by pid {qemu.Pid} ({QemuComm}): another VM (or QEMU) uses this image",
            Assert.Throws<DiskImageException>(() => new VirtioBlock(_image, readOnly: true)).Message);
        Assert.Equal(["100-101", "201-201"], LockedRanges(_image)); // the refused opens left nothing behind
        qemu.Kill();
        using var after = new VirtioBlock(_image); // QEMU's locks died with it
    }

    [Fact]
    public void A_running_QEMU_reader_shares_with_vmm_readers_only()
    {
        using var qemu = Qemu.Start(_image, readOnly: true);
        Assert.Equal(["100-100", "201-201"], LockedRanges(_image));
        Assert.Equal($"{_image}: is locked against writers by pid {qemu.Pid} ({QemuComm}): another VM (or QEMU) uses this image; " +
            "two VMs must not write one image", Assert.Throws<DiskImageException>(() => new VirtioBlock(_image)).Message);
        using var reader = new VirtioBlock(_image, readOnly: true);
        Assert.True(reader.ReadOnly);
    }

    [Fact]
    public void QEMU_refuses_an_image_vmm_writes_and_shares_one_vmm_reads()
    {
        using (var writer = new VirtioBlock(_image))
        {
            Assert.Contains("Failed to get \"write\" lock", Qemu.Refused(_image, readOnly: false));
            Assert.Contains("Failed to get shared \"write\" lock", Qemu.Refused(_image, readOnly: true));
        }
        using (var reader = new VirtioBlock(_image, readOnly: true))
        {
            Assert.Contains("Failed to get \"write\" lock", Qemu.Refused(_image, readOnly: false));
            using var qemuReader = Qemu.Start(_image, readOnly: true);
            Assert.Equal(["100-100", "100-100", "201-201", "201-201", "203-203"], LockedRanges(_image));
        }
    }

    /// <summary>The byte ranges ("first-last") of every OFD lock on <paramref name="path"/>, from /proc/locks, sorted.</summary>
    public static string[] LockedRanges(string path)
    {
        string inode = $":{Inode(path)} ";
        return [.. File.ReadLines("/proc/locks")
            .Where(l => l.Contains("OFDLCK", StringComparison.Ordinal) && l.Contains(inode, StringComparison.Ordinal))
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[^2..])
            .Select(r => $"{r[0]}-{r[1]}")
            .Order(StringComparer.Ordinal)];
    }

    /// <summary>The inode number of <paramref name="path"/>, as /proc/locks and fdinfo lock lines show it.</summary>
    private static string Inode(string path)
    {
        Assert.Equal(SocketFile.Kind.Other, SocketFile.Stat(path, out var identity));
        return identity.Inode.ToString(CultureInfo.InvariantCulture);
    }

    private sealed class Qemu : IDisposable
    {
        private readonly Process _process;

        private Qemu(Process process) => _process = process;

        public int Pid => _process.Id;

        private static Process Launch(string image, bool readOnly)
        {
            var start = new ProcessStartInfo("qemu-system-x86_64")
            {
                RedirectStandardError = true,
                RedirectStandardOutput = true,
                RedirectStandardInput = true,
            };
            foreach (string a in (string[])["-machine", "q35,accel=tcg", "-S", "-nodefaults", "-display", "none", "-monitor", "none",
                "-drive", $"file={image},format=raw,if=virtio{(readOnly ? ",readonly=on" : "")}"])
                start.ArgumentList.Add(a);
            return Process.Start(start) ?? throw new InvalidOperationException("qemu-system-x86_64 did not start");
        }

        /// <summary>A QEMU that holds the image: started, and waited for until its last lock (byte 201) shows.</summary>
        public static Qemu Start(string image, bool readOnly)
        {
            var process = Launch(image, readOnly);
            var qemu = new Qemu(process);
            string byte201 = $":{Inode(image)} 201 201"; // once: the poll below runs every 20 ms
            var deadline = Stopwatch.StartNew();
            while (!HoldsLockLine(process.Id, byte201))
            {
                if (process.HasExited || deadline.Elapsed > TimeSpan.FromSeconds(20))
                {
                    qemu.Dispose();
                    Assert.Fail($"QEMU did not come to hold {image}: {process.StandardError.ReadToEnd()}");
                }
                Thread.Sleep(20);
            }
            return qemu;
        }

        /// <summary>QEMU's error output when it refuses the image (it must exit, and not with status 0).</summary>
        public static string Refused(string image, bool readOnly)
        {
            using var process = Launch(image, readOnly);
            string stderr = process.StandardError.ReadToEndAsync().WaitAsync(TimeSpan.FromSeconds(20)).GetAwaiter().GetResult();
            Assert.True(process.WaitForExit(20_000), "QEMU started on an image vmm holds");
            Assert.NotEqual(0, process.ExitCode);
            return stderr;
        }

        /// <summary>Whether <paramref name="pid"/> holds a lock whose fdinfo line contains <paramref name="lockKey"/>
        /// (":INODE 201 201", byte 201 of the image: QEMU takes its bytes in ascending order, so then it holds all of
        /// them).</summary>
        private static bool HoldsLockLine(int pid, string lockKey)
        {
            try
            {
                return Directory.EnumerateFiles($"/proc/{pid.ToString(CultureInfo.InvariantCulture)}/fdinfo")
                    .Any(fd => File.ReadAllText(fd).Contains(lockKey, StringComparison.Ordinal));
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                return false; // not started yet, or an fd closed while we looked
            }
        }

        public void Kill()
        {
            if (!_process.HasExited)
            {
                _process.Kill(); // SIGKILL: nothing of QEMU's may linger but the kernel's cleanup
                _process.WaitForExit();
            }
        }

        public void Dispose()
        {
            Kill();
            _process.Dispose();
        }
    }
}
