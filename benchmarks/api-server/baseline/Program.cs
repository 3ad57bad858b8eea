Console.Out.Write("ready\n");
Console.Out.Flush();
var stdin = Console.OpenStandardInput();
var buf = new byte[256];
while (stdin.Read(buf, 0, buf.Length) > 0) { }
