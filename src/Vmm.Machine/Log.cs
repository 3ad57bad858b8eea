namespace Vmm.Machine;

public enum LogLevel
{
    Error,
    Warn,
    Info,
    Debug,
}

/// <summary>VMM diagnostics on stderr (guest output owns stdout). Each line starts with "vmm: ".</summary>
public sealed class Log(LogLevel level, TextWriter? writer = null)
{
    private readonly TextWriter _writer = writer ?? Console.Error;
    private readonly Lock _lock = new();

    public LogLevel Level { get; } = level;

    public bool IsEnabled(LogLevel level) => level <= Level;

    public void Write(LogLevel level, string message)
    {
        if (!IsEnabled(level))
            return;
        string prefix = level switch { LogLevel.Error => "vmm: error: ", LogLevel.Warn => "vmm: warning: ", _ => "vmm: " };
        lock (_lock)
        {
            foreach (var line in message.Split('\n'))
                _writer.WriteLine(prefix + line);
            _writer.Flush();
        }
    }

    public void Error(string m) => Write(LogLevel.Error, m);
    public void Warn(string m) => Write(LogLevel.Warn, m);
    public void Info(string m) => Write(LogLevel.Info, m);
    public void Debug(string m) => Write(LogLevel.Debug, m);

    public static bool TryParse(string text, out LogLevel level)
    {
        switch (text.ToLowerInvariant())
        {
            case "error": level = LogLevel.Error; return true;
            case "warn": case "warning": level = LogLevel.Warn; return true;
            case "info": level = LogLevel.Info; return true;
            case "debug": level = LogLevel.Debug; return true;
            default: level = LogLevel.Warn; return false;
        }
    }
}
