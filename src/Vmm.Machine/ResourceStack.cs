namespace Vmm.Machine;

/// <summary>Teardown as a LIFO stack: whatever is built later is released first, so a resource is never released
/// while something built on top of it still runs (vCPU threads before devices, device threads before the memory they
/// serve, DMA unmapped before the device connection closes). A failing release is logged and the rest still run.</summary>
public sealed class ResourceStack(Log log) : IDisposable
{
    private readonly Stack<(string Name, Action Release)> _stack = new();
    private readonly Lock _lock = new();
    private bool _disposed;

    /// <summary>Pushes <paramref name="resource"/> and returns it (for <c>var x = stack.Push(new X())</c>).</summary>
    public T Push<T>(T resource, string? name = null) where T : IDisposable
    {
        Push(name ?? typeof(T).Name, resource.Dispose);
        return resource;
    }

    /// <summary>Pushes a release step that is not an object's Dispose (e.g. "stop peer-to-peer DMA").</summary>
    public void Push(string name, Action release)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _stack.Push((name, release));
        }
    }

    public int Count
    {
        get
        {
            lock (_lock)
                return _stack.Count;
        }
    }

    public void Dispose()
    {
        while (true)
        {
            (string Name, Action Release) top;
            lock (_lock)
            {
                _disposed = true;
                if (!_stack.TryPop(out top))
                    return;
            }
            try
            {
                top.Release();
            }
            catch (Exception e)
            {
                log.Warn($"releasing {top.Name} failed: {e.Message}");
            }
        }
    }
}
