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

# pod.sh against a fake machine: systemd-run answers the commands pod.sh
# runs inside it, and "runs" a crictl pod by reading the container's
# config: NVIDIA_VISIBLE_DEVICES=all or the CDI device nvidia.com/gpu=all
# give both GPUs, a UUID gives one, nothing gives none. $INJECT=broken
# makes the runtime ignore NVIDIA_VISIBLE_DEVICES UUIDs (what a runtime
# without the CDI mode or a spec without UUID names would do).
if [ "$(id -u)" -ne 0 ]; then
	echo "selftest pod.sh: skipped (pod.sh runs as root)"
	exit "$failed"
fi
mkdir -p "$work/machine/tmp" "$work/podbin"
cat >"$work/podbin/nvidia-smi" <<'SMI'
#!/bin/sh
case "$*" in
*index*) printf '0\n1\n' ;;
*uuid*) printf 'GPU-aaaa\nGPU-bbbb\n' ;;
*) exit 9 ;;
esac
SMI
cat >"$work/podbin/nodespawn" <<'NS'
#!/bin/sh
case "$*" in
"status -o json") printf '{\n  "status": "done",\n  "machine": "kube1",\n  "node": "n1"\n}\n' ;;
status*) echo done ;;
image*) while [ $# -gt 0 ]; do [ "$1" = --layout ] && mkdir -p "$2" && echo '{}' >"$2/index.json"; shift; done ;;
*) exit 9 ;;
esac
NS
cat >"$work/podbin/systemd-run" <<'RUN'
#!/bin/sh
# The command is the last argument (after "/bin/sh -c").
for cmd; do :; done
case $cmd in
"test -c "*) exit 0 ;;
"systemctl is-active"*) echo active ;;
"test -s "*) exit 0 ;;
"nvidia-ctk cdi list") printf 'nvidia.com/gpu=0\nnvidia.com/gpu=GPU-aaaa\nnvidia.com/gpu=1\nnvidia.com/gpu=GPU-bbbb\nnvidia.com/gpu=all\n' ;;
"containerd config dump") printf '[plugins]\n  default_runtime_name = "nvidia"\n' ;;
grep*mode*) echo 'mode = "cdi"' ;;
ctr*) exit 0 ;;
*crictl*)
	dir=$(echo "$cmd" | sed -n 's/.*cd \([^;]*\);.*/\1/p')
	ctr=$MACHINE_ROOT$dir/ctr.json
	n=0
	grep -q '"value": "all"' "$ctr" && n=2
	grep -q 'nvidia.com/gpu=all' "$ctr" && n=2
	grep -q '"value": "GPU-' "$ctr" && [ "$INJECT" != broken ] && n=1
	i=0
	while [ "$i" -lt "$n" ]; do echo "nvidia$i"; i=$((i + 1)); done
	[ "$n" -gt 0 ] && echo nvidiactl && echo /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
	exit 0 ;;
*) echo "fake machine: unexpected command: $cmd" >&2; exit 9 ;;
esac
RUN
cp /bin/true "$work/podbin/busybox"
chmod +x "$work/podbin/"*
expect_pod() { # expect_pod WANT-RC NAME INJECT
	rc=0
	PATH="$work/podbin:$PATH" NODESPAWN="$work/podbin/nodespawn" BUSYBOX="$work/podbin/busybox" \
		MACHINE_ROOT="$work/machine" INJECT=$3 KUBECONFIG='' "$here/pod.sh" >"$work/out" 2>&1 || rc=$?
	if [ "$rc" -ne "$1" ]; then
		echo "selftest pod.sh $2: exited $rc, want $1; its output:"
		cat "$work/out"
		failed=1
	else
		echo "selftest pod.sh $2: ok (exit $rc)"
	fi
}
expect_pod 0 "GPUs in pods" ok
expect_pod 1 "UUIDs not injected" broken
exit "$failed"
