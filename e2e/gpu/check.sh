#!/usr/bin/env bash
# check.sh: on a host with NVIDIA GPUs, compare what nodespawn probes with
# what nvidia-smi says, and show the plan nodespawn would apply.
#
# Needs only bash, awk and the NVIDIA driver (nvidia-smi); no Go toolchain,
# no jq, no python. The nodespawn binary must be built with cgo (NVML).
#
#   NODESPAWN=./bin/nodespawn MANIFEST=examples/gpu.yaml e2e/gpu/check.sh
#
# Fails (exit 1) when the probe's GPU count, UUIDs, MIG modes or driver
# version disagree with nvidia-smi, when a probed device node is not a
# character device, when a probed library is missing, or when the dry-run
# plan leaves out a probed device node (MIG capabilities and IMEX channels:
# their directory), an NVSwitch node or a library directory.
# e2e/gpu/pod.sh goes on from here to a GPU in a pod.
set -eu
set -o pipefail

NODESPAWN=${NODESPAWN:-./bin/nodespawn}
MANIFEST=${MANIFEST:-examples/gpu.yaml}

failures=0
fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this check runs on a host with the NVIDIA driver" >&2; exit 2; }
[ -x "$NODESPAWN" ] || { echo "nodespawn binary $NODESPAWN is missing or not executable (set NODESPAWN)" >&2; exit 2; }

# json_flatten turns JSON on stdin into one "path=value" line per scalar:
# nvidia.gpus[0].uuid=GPU-..., nvidia.deviceNodes[3]=/dev/nvidia0.
# Plain POSIX awk (mawk on Debian/Ubuntu), so no jq is needed.
json_flatten() {
	awk '
	{ s = s $0 "\n" }
	END { n = length(s); pos = 1; value("") }
	function ws() { while (pos <= n && index(" \t\r\n", substr(s, pos, 1))) pos++ }
	function str(   out, c) {
		pos++
		out = ""
		while (pos <= n) {
			c = substr(s, pos, 1)
			if (c == "\\") { out = out substr(s, pos + 1, 1); pos += 2; continue }
			pos++
			if (c == "\"") return out
			out = out c
		}
		return out
	}
	function value(path,   c, lit, key, i) {
		ws()
		c = substr(s, pos, 1)
		if (c == "{") {
			pos++; ws()
			if (substr(s, pos, 1) == "}") { pos++; return }
			while (pos <= n) {
				ws(); key = str(); ws(); pos++
				value(path == "" ? key : path "." key)
				ws(); c = substr(s, pos, 1); pos++
				if (c != ",") return
			}
		} else if (c == "[") {
			pos++; ws()
			if (substr(s, pos, 1) == "]") { pos++; return }
			for (i = 0; pos <= n; i++) {
				value(path "[" i "]")
				ws(); c = substr(s, pos, 1); pos++
				if (c != ",") return
			}
		} else if (c == "\"") {
			print path "=" str()
		} else {
			lit = ""
			while (pos <= n && index(",]} \t\r\n", substr(s, pos, 1)) == 0) { lit = lit substr(s, pos, 1); pos++ }
			print path "=" lit
		}
	}'
}

# get KEY: the value at an exact flattened path ("" when absent).
get() { awk -v k="$1" 'index($0, k "=") == 1 { print substr($0, length(k) + 2); exit }' <<<"$flat"; }
# count PREFIX: how many array elements PREFIX[i] exist (PREFIX[i] or PREFIX[i].x).
count() { awk -v p="$1[" 'index($0, p) == 1 { i = substr($0, length(p) + 1); sub(/\].*/, "", i); if (!(i in seen)) { seen[i]; c++ } } END { print c + 0 }' <<<"$flat"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== nodespawn facts ($NODESPAWN)"
"$NODESPAWN" facts >"$work/facts.json"
flat=$(json_flatten <"$work/facts.json")
[ -n "$(get arch)" ] || { echo "nodespawn facts printed no facts:" >&2; cat "$work/facts.json" >&2; exit 1; }

driver=$(get nvidia.driverVersion)
ngpus=$(count nvidia.gpus)
nnodes=$(count nvidia.deviceNodes)
ndirs=$(count nvidia.libraryDirs)
echo "arch:           $(get arch)"
echo "driver version: ${driver:-<none>}"
echo "GPUs:           $ngpus"
: >"$work/probe-gpus"
for ((i = 0; i < ngpus; i++)); do
	mig=$(get "nvidia.gpus[$i].mig")
	[ "$mig" = true ] && mig=Enabled || mig=Disabled
	printf '  %s  %s  %s  MIG %s\n' "$(get "nvidia.gpus[$i].index")" "$(get "nvidia.gpus[$i].uuid")" "$(get "nvidia.gpus[$i].name")" "$mig"
	printf '%s, %s, %s\n' "$(get "nvidia.gpus[$i].index")" "$(get "nvidia.gpus[$i].uuid")" "$mig" >>"$work/probe-gpus"
done
echo "persistenced:   $(get nvidia.persistenced)"
echo "device nodes:   $nnodes"
for ((i = 0; i < nnodes; i++)); do
	node=$(get "nvidia.deviceNodes[$i]")
	if [ -c "$node" ]; then echo "  $node"; else echo "  $node (not a character device)"; fail "probed device node $node is not a character device"; fi
done
echo "library dirs:   $ndirs"
for ((i = 0; i < ndirs; i++)); do
	dir=$(get "nvidia.libraryDirs[$i].path")
	nlibs=$(count "nvidia.libraryDirs[$i].libraries")
	echo "  $dir: $nlibs libraries"
	for ((j = 0; j < nlibs; j++)); do
		lib=$(get "nvidia.libraryDirs[$i].libraries[$j]")
		[ -e "$dir/$lib" ] || fail "probed library $dir/$lib does not exist"
	done
done

echo
echo "== nvidia-smi -L"
nvidia-smi -L
# awk, not head: head would close the pipe early and pipefail would fail on
# nvidia-smi's SIGPIPE.
smi_driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | awk 'NR == 1')
echo "driver version: $smi_driver"
# MIG mode is "[N/A]" on GPUs without MIG: that is MIG off.
nvidia-smi --query-gpu=index,uuid,mig.mode.current --format=csv,noheader |
	awk -F', ' '{ print $1 ", " $2 ", " ($3 == "Enabled" ? "Enabled" : "Disabled") }' >"$work/smi-gpus"

echo
echo "== compare"
smi_count=$(wc -l <"$work/smi-gpus")
[ "$ngpus" -eq "$smi_count" ] || fail "probe found $ngpus GPUs, nvidia-smi $smi_count (is nodespawn built with cgo, so it has NVML?)"
if ! diff -u "$work/smi-gpus" "$work/probe-gpus" >"$work/gpu.diff"; then
	fail "GPU index/UUID/MIG differ between nvidia-smi (-) and the probe (+):"
	cat "$work/gpu.diff" >&2
fi
[ "$driver" = "$smi_driver" ] || fail "driver version: probe '$driver', nvidia-smi '$smi_driver'"
[ "$nnodes" -gt 0 ] || fail "probe found no NVIDIA device node"
[ "$ndirs" -gt 0 ] || fail "probe found no NVIDIA library directory in the linker cache"

echo
echo "== nodespawn apply --dry-run -f $MANIFEST"
if "$NODESPAWN" apply --dry-run -f "$MANIFEST" >"$work/plan" 2>"$work/plan.err"; then
	grep -i -E 'nvidia|/dev/dri|DeviceAllow' "$work/plan" | head -n 40 || true
	for ((i = 0; i < nnodes; i++)); do
		node=$(get "nvidia.deviceNodes[$i]")
		case $node in
		# Directories whose members change at run time are bound whole.
		/dev/nvidia-caps/* | /dev/nvidia-caps-imex-channels/*)
			grep -q -x -F -- "  | Bind=${node%/*}" "$work/plan" || fail "the dry-run plan does not bind ${node%/*} (for $node) as a directory"
			;;
		*) grep -q -F -- "$node" "$work/plan" || fail "the dry-run plan does not mention device node $node" ;;
		esac
	done
	nsw=$(count nvidia.nvswitchNodes)
	for ((i = 0; i < nsw; i++)); do
		node=$(get "nvidia.nvswitchNodes[$i]")
		[ -c "$node" ] || fail "probed NVSwitch node $node is not a character device"
		grep -q -F -- "Bind=$node" "$work/plan" || fail "the dry-run plan does not bind NVSwitch node $node"
	done
	if [ "$nsw" -gt 0 ]; then
		echo "NVSwitch nodes: $nsw; Fabric Manager: $(get nvidia.fabricManager.state) $(get nvidia.fabricManager.version)"
	fi
	if [ "$ngpus" -gt 0 ]; then
		grep -q -F 'default_runtime_name = "nvidia"' "$work/plan" ||
			echo "note: the plan keeps runc as containerd's default runtime (machine.gpuDefaultRuntime: runc?)"
	fi
	for ((i = 0; i < ndirs; i++)); do
		dir=$(get "nvidia.libraryDirs[$i].path")
		grep -q -F -- "$dir" "$work/plan" || fail "the dry-run plan does not mention library directory $dir"
	done
else
	cat "$work/plan.err" >&2
	fail "nodespawn apply --dry-run -f $MANIFEST failed"
fi

echo
if [ "$failures" -gt 0 ]; then
	echo "gpu check: $failures failure(s)"
	exit 1
fi
echo "gpu check: ok ($ngpus GPUs, driver $driver)"
