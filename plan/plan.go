// Package plan is the data between render and apply: a Plan of typed
// steps, the host Facts it was rendered for, its digest, and its text and
// JSON forms (what --dry-run prints). It imports nothing of nodespawn's own
// but internal/redact (which imports nothing of it), so every helper that
// needs these types can use them without depending on render or apply.
package plan

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// Version identifies the JSON shape of a Plan. It changes only when a
// field is removed or changes meaning; new optional fields keep it.
const Version = "nodespawn.dev/plan/v1"

// Phase groups steps by what they change. Steps run phase by phase, in order.
type Phase string

// The phases, in the order they run.
const (
	// PhaseHost changes the host outside the machine: packages, modules,
	// sysctls, nftables, swap, the .nspawn file and the service drop-in.
	PhaseHost Phase = "host"
	// PhaseRootfs creates the machine's root filesystem (image pull or
	// debootstrap) and downloads binaries into it.
	PhaseRootfs Phase = "rootfs"
	// PhaseMachine writes configuration into the rootfs before first boot.
	PhaseMachine Phase = "machine"
	// PhaseStart reloads systemd, starts the machine and waits for it.
	PhaseStart Phase = "start"
)

// Phases lists every phase in execution order.
var Phases = []Phase{PhaseHost, PhaseRootfs, PhaseMachine, PhaseStart}

// Kind names a step's type; exactly the matching field of Step is set.
type Kind string

// Step kinds.
const (
	KindFile      Kind = "file"      // Step.File
	KindDirectory Kind = "directory" // Step.Directory
	KindLink      Kind = "link"      // Step.Link (also unit masks: a link to /dev/null)
	KindPackages  Kind = "packages"  // Step.Packages
	KindModules   Kind = "modules"   // Step.Modules
	KindSysctl    Kind = "sysctl"    // Step.Sysctl
	KindNftFlush  Kind = "nft-flush" // no payload: flush the host ruleset via netlink
	KindSwapOff   Kind = "swap-off"  // Step.Swap
	KindImage     Kind = "image"     // Step.Image
	KindDownload  Kind = "download"  // Step.Download
	KindSystemd   Kind = "systemd"   // Step.Systemd
	KindWait      Kind = "wait"      // Step.Wait
)

// Plan is everything apply will do, as data. render.Plan builds it from a
// manifest and host facts; apply executes it; --dry-run prints it.
type Plan struct {
	Version string `json:"version"`
	// Machine is the nspawn machine name.
	Machine string `json:"machine"`
	// Rootfs is the machine's root directory on the host.
	Rootfs string `json:"rootfs"`
	// NodeName is the Kubernetes node name.
	NodeName string `json:"nodeName"`
	// Alternate is the machine this one takes turns with in upgrades.
	Alternate string `json:"alternate,omitempty"`
	// NodeState is the host directory holding what the node keeps across
	// machines: kubelet's state (its client certificate: the node's
	// identity) in kubelet/ and containerd's (the image cache) in
	// containerd/, bound into whichever machine runs.
	NodeState string `json:"nodeState,omitempty"`
	// Warnings are things the user should know (deprecated options, ...).
	Warnings []string `json:"warnings,omitempty"`
	// HostUnits are host services nodespawn does not manage but the node
	// needs running (nvidia-fabricmanager.service on an NVSwitch host):
	// the machine's service is ordered after them, and status reports the
	// node degraded while one is not active.
	HostUnits []string `json:"hostUnits,omitempty"`
	Steps     []Step   `json:"steps"`
}

// Step is one thing apply does. ID is stable across renders of the same
// manifest (it never depends on order or content), so results can be matched
// across runs.
type Step struct {
	ID    string `json:"id"`
	Phase Phase  `json:"phase"`
	Kind  Kind   `json:"kind"`
	// Summary says in one line what the step changes.
	Summary string `json:"summary"`
	// After lists ids of steps that must finish before this one starts;
	// steps of the same phase without such an edge may run concurrently.
	// Every step implicitly runs after all steps of earlier phases. A
	// download may fetch and verify before its After steps finish; only
	// moving it into place waits for them.
	After []string `json:"after,omitempty"`

	File      *File      `json:"file,omitempty"`
	Directory *Directory `json:"directory,omitempty"`
	Link      *Link      `json:"link,omitempty"`
	Packages  *Packages  `json:"packages,omitempty"`
	Modules   *Modules   `json:"modules,omitempty"`
	Sysctl    *Sysctl    `json:"sysctl,omitempty"`
	Swap      *Swap      `json:"swap,omitempty"`
	Image     *Image     `json:"image,omitempty"`
	Download  *Download  `json:"download,omitempty"`
	Systemd   *Systemd   `json:"systemd,omitempty"`
	Wait      *Wait      `json:"wait,omitempty"`

	// Origin is the JSON path of the manifest entry an extra step comes
	// from, where render reports a clash with another step; empty for the
	// steps nodespawn generates. It is not part of the plan's data (not in
	// its JSON, not in its digest).
	Origin string `json:"-"`
}

// Owner is a numeric owner, or names resolved against the target root's
// /etc/passwd and /etc/group (the rootfs's own for rootfs paths) at apply time.
type Owner struct {
	UID   int    `json:"uid"`
	GID   int    `json:"gid"`
	User  string `json:"user,omitempty"`
	Group string `json:"group,omitempty"`
}

// File is a regular file written atomically. Path is absolute on the host
// (rootfs files carry the /var/lib/machines/<m> prefix).
type File struct {
	Path  string `json:"path"`
	Mode  uint32 `json:"mode"`
	Owner Owner  `json:"owner"`
	// Contents is the whole file. When Encoding is "base64" it holds the
	// base64 of binary contents.
	Contents string `json:"contents"`
	Encoding string `json:"encoding,omitempty"`
	// Source, when set, is fetched at apply time instead of Contents and
	// must match SHA512 or SHA256 (Ignition's verification hash).
	Source *Source `json:"source,omitempty"`
	// Secret files are shown as <redacted> in plans and never logged.
	Secret bool `json:"secret,omitempty"`
	// Digest is set in a stored plan for a secret file (see
	// RedactKeepingDigests): the digest of its contents, so that a changed
	// secret shows as a change without the secret being kept.
	Digest string `json:"digest,omitempty"`
	// Overwrite false keeps an existing file (Ignition's overwrite: false).
	Overwrite bool `json:"overwrite"`
}

// Source is remote file contents with a verification hash.
type Source struct {
	URL string `json:"url"`
	// Hash is "sha256-<hex>" or "sha512-<hex>".
	Hash        string `json:"hash,omitempty"`
	Compression string `json:"compression,omitempty"`
}

// Directory is a directory with a mode and owner; parents are created 0755 root.
type Directory struct {
	Path  string `json:"path"`
	Mode  uint32 `json:"mode"`
	Owner Owner  `json:"owner"`
}

// Link is a symbolic link (or a hard link when Hard). Unit masks are links
// to /dev/null.
type Link struct {
	Path   string `json:"path"`
	Target string `json:"target"`
	Hard   bool   `json:"hard,omitempty"`
	Owner  Owner  `json:"owner"`
}

// Packages makes sure host packages are installed.
type Packages struct {
	Names []string `json:"names"`
	// Install false turns a missing package into an error instead of an apt install.
	Install bool `json:"install"`
}

// Modules loads kernel modules now (the modules-load.d file keeps them across boots).
type Modules struct {
	Names []string `json:"names"`
}

// Sysctl writes values to /proc/sys now (the sysctl.d file keeps them).
// A key that does not exist is an error, never skipped.
type Sysctl struct {
	Values []KeyValue `json:"values"`
}

// KeyValue is one sysctl setting.
type KeyValue struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// Swap turns swap off now and comments out swap entries in fstab.
type Swap struct {
	Fstab string `json:"fstab"`
}

// Image creates the rootfs at Dest. Exactly one of Reference, Layout and
// Debootstrap is set.
type Image struct {
	Dest string `json:"dest"`
	// Reference is an OCI reference (tag or digest) pulled from a registry.
	Reference string `json:"reference,omitempty"`
	// Layout is a local OCI image layout directory and LayoutRef the tag
	// or digest inside it.
	Layout    string `json:"layout,omitempty"`
	LayoutRef string `json:"layoutRef,omitempty"`
	// Platform is the only platform resolved from an index, e.g. "linux/amd64".
	Platform string `json:"platform"`
	// PlainHTTP registries are reached without TLS.
	PlainHTTP []string `json:"plainHTTP,omitempty"`
	// Debootstrap is the deprecated fallback.
	Debootstrap *DebootstrapSpec `json:"debootstrap,omitempty"`
	// Layers, when set, makes Dest an overlayfs mount of the image's
	// layers, each unpacked once into the host's layer store, instead of a
	// flattened tree: only the layers the store lacks are fetched.
	Layers *LayerRoot `json:"layers,omitempty"`
	// MaxUnpacked bounds, in bytes, what unpacking the image may write
	// (0: no bound of its own), and MinFree is the free space it must
	// leave on the filesystem it writes to, which apply measures when it
	// starts the pull (machine.rootfs.maxUnpackedSize, minFreeSpace).
	MaxUnpacked int64 `json:"maxUnpacked,omitempty"`
	MinFree     int64 `json:"minFree"`
}

// LayerRoot is where a machine root composed from the layer store keeps
// its parts (host paths).
type LayerRoot struct {
	// Store is the layer store: one directory per layer, by DiffID.
	Store string `json:"store"`
	// Dir holds the machine's upper and work directories and the record
	// of which layers the root is made of.
	Dir string `json:"dir"`
	// MaxLayers is the most layers one overlayfs mount of the root takes
	// on this host (the facts' LayerStore.LayerFDs: 500 by descriptor, or
	// what one page of mount options names). An image of more distinct
	// layers is flattened (FlattenFallback) or refused before any layer is
	// fetched.
	MaxLayers int `json:"maxLayers"`
	// FlattenFallback (store auto) flattens an image the store cannot
	// take instead of refusing it (store layers): one of more layers than
	// MaxLayers, or one with a layer unpacked on its own would show other
	// than the flattened pull does (oci.StoreError).
	FlattenFallback bool `json:"flattenFallback,omitempty"`
}

// DebootstrapSpec is a debootstrap invocation.
type DebootstrapSpec struct {
	Suite   string   `json:"suite"`
	Mirror  string   `json:"mirror"`
	Include []string `json:"include"`
}

// Download fetches one artifact, verifies it and installs it into the rootfs.
type Download struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	URL     string `json:"url"`
	// SHA256 is the pinned digest; when empty, ChecksumURL is fetched and
	// the digest for the artifact's file name read from it.
	SHA256      string `json:"sha256,omitempty"`
	ChecksumURL string `json:"checksumURL,omitempty"`
	// Dest is the installed path for a plain binary; for an archive it is
	// the directory the archive's members land in.
	Dest string `json:"dest"`
	Mode uint32 `json:"mode"`
	// Archive is "tar.gz" for tarballs, empty for a plain binary.
	Archive string `json:"archive,omitempty"`
	// Members, for archives, maps archive member paths to names under
	// Dest; empty means every regular file, keeping its relative path.
	Members []Member `json:"members,omitempty"`
}

// Member is one file taken out of a downloaded archive.
type Member struct {
	Path string `json:"path"`
	Dest string `json:"dest"`
}

// Systemd is an action on the host's systemd (via D-Bus).
type Systemd struct {
	// Action is "daemon-reload", "enable", "start" or "restart".
	Action string `json:"action"`
	Unit   string `json:"unit,omitempty"`
}

// Wait blocks until the machine is registered with machined and the units
// are active inside it, or the timeout passes.
type Wait struct {
	Machine        string   `json:"machine"`
	Units          []string `json:"units"`
	TimeoutSeconds int      `json:"timeoutSeconds"`
}

// Digest is the sha256 of the plan's canonical JSON (secrets included, so a
// changed token changes the plan).
func (p *Plan) Digest() string {
	b, err := json.Marshal(p)
	if err != nil {
		// A Plan is plain data; Marshal cannot fail on it.
		panic(fmt.Sprintf("plan: marshal plan: %v", err))
	}
	return digest.FromBytes(b).String()
}

// Step returns the step with id, or nil.
func (p *Plan) Step(id string) *Step {
	for i := range p.Steps {
		if p.Steps[i].ID == id {
			return &p.Steps[i]
		}
	}
	return nil
}
