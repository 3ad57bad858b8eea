using Vmm.Interop;

namespace Vmm.Machine;

/// <summary>TEST HOOK (issue 12): <c>VMM_TEST_SECCOMP_VIOLATION=vcpu</c> makes vCPU 0 call <c>socket()</c> once,
/// right after its filter is installed — a forbidden call, so that a test can see the SIGSYS report and the
/// process die. No guest can make vmm do that; without the variable this does nothing.</summary>
internal static class SeccompTestHook
{
    private static readonly string? s_role = Environment.GetEnvironmentVariable("VMM_TEST_SECCOMP_VIOLATION");

    public static void AfterFilter(string role, int id)
    {
        if (s_role == role && id == 0)
            Tmds.Linux.LibC.syscall(41 /* SYS_socket */, 1 /* AF_UNIX */, 1 /* SOCK_STREAM */, 0);
    }
}
