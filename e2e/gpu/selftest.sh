#!/usr/bin/env bash
# selftest.sh: runs check.sh against a fake nvidia-smi and a fake nodespawn,
# so the script's parsing and comparisons are tested on any machine.
#   e2e/gpu/selftest.sh
set -eu
set -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/lib"
: >"$work/lib/libcuda.so.1"
: >"$work/lib/libnvidia-ml.so.1"

# The fake nvidia-smi answers the three queries check.sh makes.
cat >"$work/bin/nvidia-smi" <<'SMI'
#!/bin/sh
case "$*" in
"-L") printf 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)\n' ;;
*driver_version*) printf '550.54.14\n550.54.14\n' ;;
*mig.mode.current*) printf '0, GPU-aaaa, Enabled\n1, GPU-bbbb, [N/A]\n' ;;
*) exit 9 ;;
esac
SMI
# The fake nodespawn prints $FACTS for "facts" and a plan naming the nodes.
cat >"$work/bin/nodespawn" <<'NS'
#!/bin/sh
case "$1" in
facts) cat "$FACTS" ;;
apply) printf 'Bind=/dev/null\nDeviceAllow=/dev/null rwm\nBindReadOnly=%s:/run/host-nvidia/0\n' "$LIBDIR" ;;
esac
NS
chmod +x "$work/bin/nvidia-smi" "$work/bin/nodespawn"

# facts GPU1-UUID GPU0-MIG: the facts JSON, compact (one line, as
# json.Marshal writes it) to exercise the flattener without whitespace.
facts() {
	printf '{"arch":"amd64","hostname":"h","resolvConf":"/etc/resolv.conf","kvm":false,"nvidia":{"driverVersion":"550.54.14","gpus":[{"index":0,"uuid":"GPU-aaaa","name":"NVIDIA H100 80GB HBM3","mig":%s},{"index":1,"uuid":"%s","name":"NVIDIA H100 80GB HBM3"}],"deviceNodes":["/dev/null"],"libraryDirs":[{"path":"%s","libraries":["libcuda.so.1","libnvidia-ml.so.1"]}]},"hasSystemdContainer":true,"swap":false}\n' "$2" "$1" "$work/lib"
}

failed=0
expect() { # expect WANT-RC NAME UUID MIG
	facts "$3" "$4" >"$work/facts.json"
	rc=0
	PATH="$work/bin:$PATH" NODESPAWN="$work/bin/nodespawn" FACTS="$work/facts.json" LIBDIR="$work/lib" \
		MANIFEST=/dev/null "$here/check.sh" >"$work/out" 2>&1 || rc=$?
	if [ "$rc" -ne "$1" ]; then
		echo "selftest $2: check.sh exited $rc, want $1; its output:"
		cat "$work/out"
		failed=1
	else
		echo "selftest $2: ok (exit $rc)"
	fi
}
expect 0 "matching GPUs" GPU-bbbb true
expect 1 "UUID differs" GPU-cccc true
expect 1 "MIG differs" GPU-bbbb false
exit "$failed"
