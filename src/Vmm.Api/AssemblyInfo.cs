// vmm is a Linux program: the API serves on a unix socket file (mode, inode).
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]

namespace Vmm.Api;
