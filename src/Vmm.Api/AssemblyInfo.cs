namespace Vmm.Api;
