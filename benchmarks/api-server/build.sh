#!/bin/bash
# Publishes the three NativeAOT apps; logs to build-<name>.log
cd "$(dirname "$0")"
mkdir -p build
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
for p in baseline own kestrel; do
  s=$(date +%s)
  dotnet publish $p/$p.csproj -c Release -r linux-x64 -o build/out/$p -v:n -clp:Summary > build/build-$p.log 2>&1
  echo "$p rc=$? $(( $(date +%s)-s ))s warnings=$(grep -cE 'warning (IL|CS|NU|NETSDK)' build/build-$p.log)"
done
