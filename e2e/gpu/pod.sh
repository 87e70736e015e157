#!/usr/bin/env bash
# pod.sh: on a GPU host where nodespawn has applied a node (or, with
# APPLY=1, applies it now), check that containers in the node get the GPUs:
# first the machine (device nodes, live device directories, the CDI spec,
# nvidia as containerd's default runtime), then a pod made with crictl inside
# the machine (no cluster, no registry: the image is built here from
# busybox), then, with KUBECONFIG, a pod through the API server and the
# NVIDIA device plugin's nvidia.com/gpu on the Node.
#
#   NODESPAWN=./bin/nodespawn MANIFEST=examples/gpu.yaml APPLY=1 e2e/gpu/pod.sh
#   KUBECONFIG=~/.kube/config GPU_IMAGE=nvcr.io/nvidia/cuda:12.9.1-base-ubuntu24.04 e2e/gpu/pod.sh
#
# Needs bash, awk, busybox (busybox-static: the pod's image), the nodespawn
# binary (built with cgo, for NVML), and for the cluster part kubectl.
# MACHINE defaults to the machine nodespawn status names. Fails (exit 1) when
# a check fails, 2 when the host cannot run the check at all.
#
# Written without a GPU machine at hand: prepared for a session that has one,
# not yet run on a GPU host.
set -eu
set -o pipefail

NODESPAWN=${NODESPAWN:-./bin/nodespawn}
MANIFEST=${MANIFEST:-examples/gpu.yaml}
APPLY=${APPLY:-0}
BUSYBOX=${BUSYBOX:-$(command -v busybox || true)}
IMAGE_REF=localhost/nodespawn-gpu-probe:1
# How long the pod and the device plugin get.
TIMEOUT=${TIMEOUT:-300}

failures=0
fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}
die() {
	echo "$*" >&2
	exit 2
}

[ "$(id -u)" -eq 0 ] || die "run as root: the checks look inside the nspawn machine"
[ -x "$NODESPAWN" ] || die "nodespawn binary $NODESPAWN is missing or not executable (set NODESPAWN)"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check runs on a host with the NVIDIA driver"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$APPLY" = 1 ]; then
	echo "== nodespawn apply -f $MANIFEST"
	"$NODESPAWN" apply -f "$MANIFEST" || die "nodespawn apply failed (exit $?)"
fi
echo "== nodespawn status --wait --long"
"$NODESPAWN" status --wait --long || fail "nodespawn status says the node is not done"
MACHINE=${MACHINE:-$("$NODESPAWN" status -o json | awk -F'"' '$2 == "machine" { print $4; exit }')}
[ -n "$MACHINE" ] || die "no machine: apply a GPU manifest first (APPLY=1 MANIFEST=...)"

# inside CMD: run a shell command in the machine, its output on stdout.
inside() {
	systemd-run -M "$MACHINE" --quiet --wait --pipe --collect \
		--setenv=CONTAINER_RUNTIME_ENDPOINT=unix:///run/containerd/containerd.sock -- /bin/sh -c "$*"
}

ngpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
uuids=$(nvidia-smi --query-gpu=uuid --format=csv,noheader)
echo "host: $ngpus GPUs"

echo
echo "== the machine $MACHINE"
for ((i = 0; i < ngpus; i++)); do
	inside "test -c /dev/nvidia$i" || fail "/dev/nvidia$i is not in the machine"
done
inside "test -c /dev/nvidiactl" || fail "/dev/nvidiactl is not in the machine"
# Live directories: bound whole, so what the host has now is what the
# machine sees, also what the host made after apply.
for dir in /dev/nvidia-caps /dev/nvidia-caps-imex-channels; do
	[ -d "$dir" ] || continue
	# shellcheck disable=SC2012 # device node names are plain
	host=$(ls "$dir" | sort | tr '\n' ' ')
	seen=$(inside "ls $dir" | sort | tr '\n' ' ') || true
	[ "$host" = "$seen" ] || fail "$dir differs: host '$host', machine '$seen'"
	for n in "$dir"/*; do
		[ -c "$n" ] || continue
		# Opening it needs the device policy to allow its class.
		inside "dd if=$n of=/dev/null count=0 2>/dev/null" || fail "$n cannot be opened in the machine (DeviceAllow by class?)"
	done
done
for n in /dev/nvidia-nvswitch* /dev/nvidia-nvlink; do
	[ -c "$n" ] || continue
	inside "test -c $n" || fail "NVSwitch node $n is not in the machine"
done
if ls /dev/nvidia-nvswitch[0-9]* >/dev/null 2>&1; then
	state=$(systemctl is-active nvidia-fabricmanager.service || true)
	echo "NVSwitch host: nvidia-fabricmanager is $state"
	[ "$state" = active ] || fail "nvidia-fabricmanager is $state on an NVSwitch host (nodespawn status should say degraded)"
fi
inside "systemctl is-active nodespawn-nvidia.service" >/dev/null || fail "nodespawn-nvidia.service (the per-boot refresh) did not succeed in the machine"
inside "test -s /var/run/cdi/nvidia.yaml" || fail "no CDI spec /var/run/cdi/nvidia.yaml in the machine"
inside "nvidia-ctk cdi list" >"$work/cdi" 2>/dev/null || fail "nvidia-ctk cdi list failed in the machine"
grep -q -x -F 'nvidia.com/gpu=all' "$work/cdi" || fail "the CDI spec has no nvidia.com/gpu=all"
for u in $uuids; do
	grep -q -x -F "nvidia.com/gpu=$u" "$work/cdi" || fail "the CDI spec does not name GPU $u (the device plugin asks by UUID)"
done
inside "containerd config dump" >"$work/containerd.toml" || fail "containerd config dump failed in the machine"
default=$(awk -F'"' '/default_runtime_name/ { print $2; exit }' "$work/containerd.toml")
echo "containerd's default runtime: $default"
[ "$default" = nvidia ] || echo "note: the default runtime is $default (machine.gpuDefaultRuntime: runc?); the pods below name no runtime, so they test that default"
inside "grep -E '^ *mode *=' /etc/nvidia-container-runtime/config.toml" || fail "no mode in the machine's /etc/nvidia-container-runtime/config.toml"

echo
echo "== a pod through crictl in the machine (default runtime, no cluster)"
[ -x "$BUSYBOX" ] || die "busybox not found (apt install busybox-static, or set BUSYBOX): it is the pod's image"
mkdir -p "$work/rootfs/bin"
cp "$BUSYBOX" "$work/rootfs/bin/busybox"
for tool in sh ls cat grep; do ln -s busybox "$work/rootfs/bin/$tool"; done
"$NODESPAWN" image build --rootfs "$work/rootfs" --ref "$IMAGE_REF" --layout "$work/layout" >/dev/null ||
	die "nodespawn image build failed"
tar -C "$work/layout" -cf "$work/image.tar" .
# The machine's root on the host (MACHINE_ROOT only for selftest.sh).
machine_root=${MACHINE_ROOT:-/var/lib/machines/$MACHINE}
cp "$work/image.tar" "$machine_root/tmp/nodespawn-gpu-probe.tar"
inside "ctr -n k8s.io images import --base-name ${IMAGE_REF%:*} /tmp/nodespawn-gpu-probe.tar && rm -f /tmp/nodespawn-gpu-probe.tar" >/dev/null ||
	fail "ctr images import failed in the machine"

# crictl_pod NAME ENV-JSON CDI-JSON: run a pod whose container lists
# /dev/nvidia* and the driver's NVML library, print its log.
crictl_pod() {
	local name=$1 env=$2 cdi=$3 dir=/tmp/nodespawn-gpu-$1
	mkdir -p "$machine_root$dir"
	cat >"$machine_root$dir/pod.json" <<-EOF
		{"metadata": {"name": "$name", "namespace": "default", "uid": "nodespawn-gpu-$name"}, "linux": {}, "log_directory": "$dir/logs"}
	EOF
	cat >"$machine_root$dir/ctr.json" <<-EOF
		{"metadata": {"name": "probe"}, "image": {"image": "$IMAGE_REF"}, "log_path": "probe.log",
		 "command": ["/bin/sh", "-c", "ls /dev/ | grep -E '^nvidia' ; ls /usr/lib/*/libnvidia-ml.so.1 /usr/lib64/libnvidia-ml.so.1 2>/dev/null; true"],
		 "envs": $env, "CDI_devices": $cdi, "linux": {}}
	EOF
	inside "set -e; cd $dir; pod=\$(crictl runp pod.json); ctr=\$(crictl create \$pod ctr.json pod.json); crictl start \$ctr >/dev/null;
		for i in \$(seq 60); do crictl inspect -o go-template --template '{{.status.state}}' \$ctr | grep -q EXITED && break; sleep 1; done;
		crictl logs \$ctr; crictl stopp \$pod >/dev/null; crictl rmp \$pod >/dev/null"
}
# devices_seen LOG: how many /dev/nvidiaN a pod's log lists.
devices_seen() { grep -c -E '^nvidia[0-9]+$' "$1" || true; }

crictl_pod visible '[{"key": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]' '[]' >"$work/visible.log" 2>&1 ||
	fail "the NVIDIA_VISIBLE_DEVICES=all pod did not run: $(cat "$work/visible.log")"
cat "$work/visible.log"
[ "$(devices_seen "$work/visible.log")" -eq "$ngpus" ] || fail "NVIDIA_VISIBLE_DEVICES=all: the pod sees $(devices_seen "$work/visible.log") of $ngpus GPUs"
grep -q 'libnvidia-ml.so.1' "$work/visible.log" || fail "NVIDIA_VISIBLE_DEVICES=all: no libnvidia-ml.so.1 (NVML) in the pod"

first=$(awk 'NR == 1' <<<"$uuids")
crictl_pod one "[{\"key\": \"NVIDIA_VISIBLE_DEVICES\", \"value\": \"$first\"}]" '[]' >"$work/one.log" 2>&1 ||
	fail "the one-GPU pod did not run: $(cat "$work/one.log")"
[ "$(devices_seen "$work/one.log")" -eq 1 ] || fail "NVIDIA_VISIBLE_DEVICES=$first (the device plugin's env strategy): the pod sees $(devices_seen "$work/one.log") GPUs, want 1"

crictl_pod cdi '[]' '[{"name": "nvidia.com/gpu=all"}]' >"$work/cdi.log" 2>&1 ||
	fail "the CDI pod did not run: $(cat "$work/cdi.log")"
[ "$(devices_seen "$work/cdi.log")" -eq "$ngpus" ] || fail "CDI nvidia.com/gpu=all (the device plugin's cdi-cri strategy): the pod sees $(devices_seen "$work/cdi.log") of $ngpus GPUs"

crictl_pod none '[]' '[]' >"$work/none.log" 2>&1 || fail "the pod without GPUs did not run: $(cat "$work/none.log")"
[ "$(devices_seen "$work/none.log")" -eq 0 ] || fail "a pod that asks for no GPU sees $(devices_seen "$work/none.log")"

if [ -n "${KUBECONFIG:-}" ]; then
	echo
	echo "== the cluster (KUBECONFIG=$KUBECONFIG)"
	node=$("$NODESPAWN" status -o json | awk -F'"' '$2 == "node" { print $4; exit }')
	kubectl wait --for=condition=Ready "node/$node" --timeout="${TIMEOUT}s" || fail "node $node is not Ready"
	# The device plugin (installed by the cluster: the GPU Operator, or
	# its static DaemonSet) needs NVML in its own pod: with nvidia as the
	# default runtime it has it, with no RuntimeClass.
	end=$((SECONDS + TIMEOUT))
	gpus=
	while [ "$SECONDS" -lt "$end" ]; do
		gpus=$(kubectl get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')
		[ -n "$gpus" ] && [ "$gpus" != 0 ] && break
		sleep 5
	done
	echo "nvidia.com/gpu allocatable on $node: ${gpus:-none}"
	[ "${gpus:-0}" -eq "$ngpus" ] || fail "nvidia.com/gpu on $node is '${gpus:-none}', want $ngpus (is the NVIDIA device plugin installed?)"
	if [ -n "${GPU_IMAGE:-}" ]; then
		cat >"$work/pod.yaml" <<-EOF
			apiVersion: v1
			kind: Pod
			metadata: {name: nodespawn-gpu-smi, namespace: default}
			spec:
			  restartPolicy: Never
			  nodeName: $node
			  tolerations: [{operator: Exists}]
			  containers:
			  - name: smi
			    image: $GPU_IMAGE
			    command: [nvidia-smi, -L]
			    resources: {limits: {nvidia.com/gpu: 1}}
		EOF
		kubectl delete -f "$work/pod.yaml" --ignore-not-found >/dev/null
		kubectl apply -f "$work/pod.yaml" >/dev/null
		kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/nodespawn-gpu-smi --timeout="${TIMEOUT}s" ||
			fail "the nvidia-smi pod did not succeed: $(kubectl describe pod nodespawn-gpu-smi | tail -n 20)"
		kubectl logs nodespawn-gpu-smi | tee "$work/smi.log"
		[ "$(grep -c '^GPU [0-9]' "$work/smi.log" || true)" -eq 1 ] || fail "nvidia-smi in the pod does not list exactly the one GPU it was given"
		kubectl delete -f "$work/pod.yaml" --wait=false >/dev/null
	fi
fi

echo
if [ "$failures" -gt 0 ]; then
	echo "gpu pod check: $failures failure(s)"
	exit 1
fi
echo "gpu pod check: ok ($ngpus GPUs in pods of machine $MACHINE)"
