namespace Vmm.Interop.Seccomp;

/// <summary>Starts vmm's role threads so that each inherits only the process filter. A thread inherits its
/// creator's filters, and role threads create no threads (their filters refuse clone); but a guest driver that
/// starts a virtio device does so from a vCPU thread (a config write), and that device's worker must not run under
/// the vCPU filter. So a role thread hands the start to the spawner, a thread under the process filter alone.</summary>
public static class SeccompThreads
{
    [ThreadStatic] private static bool t_inRole;
    private static readonly Queue<(Thread? Thread, Action? Action, ManualResetEventSlim? Done)> s_queue = new();
    private static readonly object s_lock = new();
    private static Thread? s_spawner;

    internal static void MarkRole() => t_inRole = true;

    /// <summary>Starts <paramref name="thread"/>: directly, or through the spawner on a role thread.</summary>
    public static void Start(Thread thread)
    {
        if (!OnRoleThreadWithSpawner())
        {
            thread.Start();
            return;
        }
        using var done = new ManualResetEventSlim();
        Enqueue((thread, null, done));
        done.Wait();
    }

    /// <summary>Runs <paramref name="action"/> now, or on a role thread soon on the spawner: for work that may make
    /// the .NET thread pool start a worker (completing a task whose continuations run asynchronously, Task.Run).
    /// The action must not block for long.
    ///
    /// <para>What happens without it. A role thread's filter answers clone with EAGAIN (an errno, not the SIGSYS
    /// kill), so a worker the pool starts from a role thread fails to start; the pool catches that
    /// (ThreadStartException), undoes its count and the work item stays queued. Nothing is lost and nothing dies,
    /// but the item waits for a busy worker to come free, or for the gate thread (started by the main thread before
    /// any role thread exists) to see the queue starve and add a worker itself, which takes half a second or more
    /// (it looks every 500 ms). On a path that ends a VM, ejects a device or echoes a key, that wait is the cost this
    /// avoids.</para></summary>
    public static void Post(Action action)
    {
        if (!OnRoleThreadWithSpawner())
        {
            action();
            return;
        }
        Enqueue((null, action, null));
    }

    /// <summary>t_inRole first: a thread without a role never looks further. s_spawner is written once, before any
    /// role thread exists, so a volatile read needs no lock.</summary>
    private static bool OnRoleThreadWithSpawner() => t_inRole && Volatile.Read(ref s_spawner) is not null;

    private static void Enqueue((Thread? Thread, Action? Action, ManualResetEventSlim? Done) item)
    {
        lock (s_lock)
        {
            s_queue.Enqueue(item);
            Monitor.PulseAll(s_lock);
        }
    }

    /// <summary>The spawner and the runtime's lazily created threads that a role thread would otherwise be the
    /// first to need: the thread pool's gate thread and a worker, the timer thread. Called by the main thread
    /// before any role thread exists.</summary>
    internal static void StartSpawner()
    {
        lock (s_lock)
        {
            if (s_spawner is not null)
                return;
            var spawner = new Thread(SpawnLoop) { Name = "vmm-spawner", IsBackground = true };
            spawner.Start();
            Volatile.Write(ref s_spawner, spawner);
        }
        _ = Environment.ProcessorCount; // glibc reads /sys/devices/system/cpu/online for it, once
        using var ran = new ManualResetEventSlim();
        ThreadPool.UnsafeQueueUserWorkItem(e => e.Set(), ran, preferLocal: false);
        ran.Wait();
        using var fired = new ManualResetEventSlim();
        using (new Timer(e => ((ManualResetEventSlim)e!).Set(), fired, 1, Timeout.Infinite))
            fired.Wait();
    }

    private static void SpawnLoop()
    {
        while (true)
        {
            (Thread? Thread, Action? Action, ManualResetEventSlim? Done) item;
            lock (s_lock)
            {
                while (s_queue.Count == 0)
                    Monitor.Wait(s_lock);
                item = s_queue.Dequeue();
            }
            try
            {
                item.Thread?.Start();
                item.Action?.Invoke();
            }
            catch (Exception e)
            {
                // A thread that cannot start (out of memory) or a posted action's bug: the caller sees the thread
                // not running; the spawner must stay.
                Console.Error.WriteLine($"vmm: error: {e.GetType().Name}: {e.Message}");
            }
            finally
            {
                item.Done?.Set();
            }
        }
    }
}
