using System.Net.Sockets;
using System.Text.Json;
using Vmm.Api;

namespace Vmm.Cli;

/// <summary>`vmm remote --api-socket PATH COMMAND [ARGS]`: the API client, as ch-remote is for Cloud Hypervisor (same
/// command names). Prints a response body on stdout; an error's messages on stderr, one per line. Exit status: 0 done,
/// 1 the API refused (4xx/5xx), 2 bad usage, 12 no API answering on the socket.</summary>
public static class RemoteCommand
{
    public const string HelpText = """
        Usage: vmm remote --api-socket PATH COMMAND [ARGS]

        Commands (Cloud Hypervisor's ch-remote names):
          ping                 vmm.ping: version, pid, features
          info                 vm.info: config, state, devices
          counters             vm.counters
          create FILE.json     vm.create with a VmConfig file
          boot | pause | resume | shutdown | reboot | power-button | delete
                               the vm.* action of that name
          shutdown-vmm         vmm.shutdown: stop the VM and end the vmm process
          add-disk path=FILE[,readonly=on][,direct=on][,serial=S][,id=ID]
          add-net tap=NAME[,mac=MAC][,id=ID]
          add-device path=/sys/bus/pci/devices/DDDD:BB:DD.F[,id=ID]
          add-user-device socket=PATH[,id=ID]
          add-fs tag=TAG,socket=PATH[,num_queues=N][,queue_size=N][,id=ID]
          add-vsock cid=N,socket=PATH[,id=ID]
                               hot-add a device to the running VM (prints its id and PCI address)
          remove-device ID     ask the guest to eject the device and wait until it did
        """;

    /// <summary>The hot-add commands: endpoint and the keys of their key=value argument, true for on/off keys
    /// (JSON booleans), false for strings (and numbers: <see cref="NumberKeys"/>).</summary>
    public static readonly IReadOnlyDictionary<string, (string Endpoint, Dictionary<string, bool> Keys)> AddCommands = new Dictionary<string, (string, Dictionary<string, bool>)>
    {
        ["add-disk"] = ("vm.add-disk", new() { ["path"] = false, ["readonly"] = true, ["direct"] = true, ["serial"] = false, ["id"] = false }),
        ["add-net"] = ("vm.add-net", new() { ["tap"] = false, ["mac"] = false, ["id"] = false }),
        ["add-device"] = ("vm.add-device", new() { ["path"] = false, ["id"] = false }),
        ["add-user-device"] = ("vm.add-user-device", new() { ["socket"] = false, ["id"] = false }),
        ["add-fs"] = ("vm.add-fs", new() { ["tag"] = false, ["socket"] = false, ["num_queues"] = false, ["queue_size"] = false, ["id"] = false }),
        ["add-vsock"] = ("vm.add-vsock", new() { ["cid"] = false, ["socket"] = false, ["id"] = false }),
    };

    /// <summary>Keys whose values are JSON numbers in CH's schema.</summary>
    private static readonly HashSet<string> NumberKeys = ["cid", "num_queues", "queue_size"];

    private static readonly Dictionary<string, (string Method, string Endpoint)> s_commands = new()
    {
        ["ping"] = ("GET", "vmm.ping"),
        ["info"] = ("GET", "vm.info"),
        ["counters"] = ("GET", "vm.counters"),
        ["create"] = ("PUT", "vm.create"),
        ["boot"] = ("PUT", "vm.boot"),
        ["pause"] = ("PUT", "vm.pause"),
        ["resume"] = ("PUT", "vm.resume"),
        ["shutdown"] = ("PUT", "vm.shutdown"),
        ["reboot"] = ("PUT", "vm.reboot"),
        ["power-button"] = ("PUT", "vm.power-button"),
        ["delete"] = ("PUT", "vm.delete"),
        ["shutdown-vmm"] = ("PUT", "vmm.shutdown"),
    };

    public static int Run(string[] args)
    {
        string? socket = null;
        var rest = new List<string>();
        for (int i = 0; i < args.Length; i++)
        {
            if (args[i] is "-h" or "--help")
            {
                Console.Out.WriteLine(HelpText);
                return ExitStatus.Success;
            }
            if (args[i] == "--api-socket" && i + 1 < args.Length)
                socket = args[++i];
            else if (args[i].StartsWith("--api-socket=", StringComparison.Ordinal))
                socket = args[i]["--api-socket=".Length..];
            else
                rest.Add(args[i]);
        }
        if (socket is null || rest.Count == 0)
            return Usage("vmm remote needs --api-socket PATH and a command (vmm remote --help)");
        if (socket.StartsWith("path=", StringComparison.Ordinal))
            socket = socket[5..];
        byte[]? body = null;
        (string Method, string Endpoint) command;
        if (AddCommands.TryGetValue(rest[0], out var add))
        {
            if (rest.Count != 2)
                return Usage($"vmm remote {rest[0]} needs one argument, key=value[,key=value...] (vmm remote --help)");
            try
            {
                body = AddBody(rest[0], rest[1], add.Keys);
            }
            catch (UsageException e)
            {
                return Usage(e.Message);
            }
            command = ("PUT", add.Endpoint);
        }
        else if (rest[0] == "remove-device")
        {
            if (rest.Count != 2 || rest[1].Length == 0)
                return Usage("vmm remote remove-device needs the device's id");
            body = JsonSerializer.SerializeToUtf8Bytes(new VmRemoveDevice { Id = rest[1] }, ApiJsonContext.Default.VmRemoveDevice);
            command = ("PUT", "vm.remove-device");
        }
        else if (!s_commands.TryGetValue(rest[0], out command))
            return Usage($"vmm remote: unknown command '{rest[0]}' (vmm remote --help)");
        else if (rest[0] == "create")
        {
            if (rest.Count != 2)
                return Usage("vmm remote create needs one VmConfig JSON file");
            try
            {
                body = File.ReadAllBytes(rest[1]);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                return Usage($"vmm remote create {rest[1]}: {e.Message}");
            }
        }
        else if (rest.Count != 1)
            return Usage($"vmm remote {rest[0]} takes no arguments");
        ApiResponse response;
        try
        {
            response = new ApiClient(socket).Send(command.Method, command.Endpoint, body);
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            Console.Error.WriteLine($"vmm: error: {socket}: no vmm API answers there: {e.Message}");
            return ExitStatus.VmmError;
        }
        if (response.Ok)
        {
            if (response.Body.Length > 0)
                Console.Out.WriteLine(response.Body);
            return ExitStatus.Success;
        }
        Console.Error.WriteLine($"vmm: error: {command.Endpoint}: HTTP {response.Status}");
        foreach (string line in ErrorMessages(response.Body))
            Console.Error.WriteLine($"vmm: error:   {line}");
        return 1;
    }

    /// <summary>ch-remote's "key=value,key=value" argument as the JSON object of the endpoint (on/off keys become
    /// booleans); an unknown or repeated key is a usage error.</summary>
    public static byte[] AddBody(string command, string argument, Dictionary<string, bool> keys)
    {
        using var stream = new MemoryStream();
        using (var json = new Utf8JsonWriter(stream))
        {
            json.WriteStartObject();
            string option = $"vmm remote {command}";
            // The run options' parser: the same errors, and the same on/off words.
            var kv = Options.ParseKeyValues(argument, option, [.. keys.Keys]);
            foreach (var (key, value) in kv)
            {
                if (NumberKeys.Contains(key))
                    json.WriteNumber(key, ulong.TryParse(value, out ulong number) ? number
                        : throw new UsageException($"{option}: {key} must be a number, not '{value}'"));
                else if (!keys[key])
                    json.WriteString(key, value);
                else
                    json.WriteBoolean(key, Options.OnOff(kv, key, option));
            }
            json.WriteEndObject();
        }
        return stream.ToArray();
    }

    /// <summary>CH's error body is a JSON array of strings; anything else is printed as it came.</summary>
    private static IEnumerable<string> ErrorMessages(string body)
    {
        var lines = new List<string>();
        try
        {
            using var doc = JsonDocument.Parse(body);
            if (doc.RootElement.ValueKind == JsonValueKind.Array)
            {
                foreach (var e in doc.RootElement.EnumerateArray())
                    lines.Add(e.ValueKind == JsonValueKind.String ? e.GetString()! : e.GetRawText());
                return lines;
            }
        }
        catch (JsonException)
        {
        }
        return body.Length > 0 ? [body] : [];
    }

    private static int Usage(string message)
    {
        Console.Error.WriteLine($"vmm: error: {message}");
        return ExitStatus.Usage;
    }
}
