// vmm is a Linux program: KVM, memfd, signals.
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
