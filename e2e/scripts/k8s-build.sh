# k8s-build.sh: sourced by the build scripts (build-components.sh,
# build-kubelet-prev.sh), not run. Needs go on PATH and
# GOMODCACHE exported (the caller's private module cache).
#
# k8s_build VERSION OUTDIR CMD...: builds the kubernetes commands CMD (kubelet,
# kubectl, kube-apiserver, ...) at VERSION from the k8s.io/kubernetes module
# into OUTDIR in one go build (they share most of the compile work), with the
# version ldflags of a release build, so `kubelet --version` and the Node's
# kubeletVersion say VERSION.
#
# k8s.io/kubernetes has ./staging replace directives, so go install refuses
# it; a wrapper module pins each staging module to its published version
# (v0.MINOR.PATCH for v1.MINOR.PATCH).
#
k8s_build() {
	local v=${1:?k8s_build VERSION OUTDIR CMD...} out=${2:?k8s_build VERSION OUTDIR CMD...}
	shift 2
	[ $# -gt 0 ] || { echo "k8s_build: no commands to build" >&2; return 1; }
	local minor staging w c p ldf="-s -w" pkgs=()
	minor=$(echo "$v" | cut -d. -f2)
	staging="v0.${v#v1.}"
	w=$(mktemp -d)
	go mod download -json "k8s.io/kubernetes@$v" >/dev/null
	{
		printf 'module example.com/k8swrap\n\ngo 1.26.0\n\ngodebug default=go1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
		grep -E '=> \./staging' "$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$v.mod" |
			awk -v s="$staging" '{print "\t"$1" => "$1" "s}'
		echo ')'
	} >"$w/go.mod"
	for c in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
	{
		printf '//go:build tools\n\npackage tools\n\nimport (\n'
		printf '\t_ "%s"\n' "${pkgs[@]}"
		printf ')\n'
	} >"$w/tools.go"
	for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
		ldf="$ldf -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
	done
	mkdir -p "$out"
	(cd "$w" && go mod tidy && CGO_ENABLED=0 go build -trimpath -ldflags="$ldf" -o "$out/" "${pkgs[@]}")
	rm -rf "$w"
}
