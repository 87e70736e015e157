package apply

import (
	"context"
	"errors"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
)

// Deps are the implementations behind the steps apply does not do itself.
// Each is a small interface so tests can put a fake at exactly that seam.
// A nil member makes the steps needing it "skipped", with the reason in
// the record and the log.
type Deps struct {
	Images     ImagePuller
	Downloader Downloader
	Host       Host
	Systemd    Systemd
}

// ImagePuller creates the machine's rootfs (Image steps).
type ImagePuller interface {
	// Pull makes dest (img.Dest, a path in root, the host root) a
	// complete, verified rootfs, staging it and renaming it into place so
	// a crash never leaves a half-made tree there. changed is false when
	// dest already held the image.
	Pull(ctx context.Context, img *plan.Image, root *confine.Root, dest string) (changed bool, err error)
}

// Downloader fetches verified artifacts (Download steps) and remote file
// contents (File steps with a Source).
type Downloader interface {
	// Fetch downloads d and verifies it without touching dest (d.Dest as a
	// path in root: the machine's rootfs or the host root; root is nil
	// while the rootfs does not exist yet). Apply calls it as soon as the step's phase starts, before
	// the steps the download runs After (the rootfs it lands in) are done,
	// and again if one of those changed something meanwhile. When dest
	// already holds the artifact, Fetch may download nothing; a second
	// Fetch of an artifact already verified must not download it again.
	Fetch(ctx context.Context, d *plan.Download, root *confine.Root, dest string) (Artifact, error)
	// Contents fetches src and decompresses it per src.Compression. Apply
	// checks src.Hash (Ignition's, over the decompressed file) itself.
	Contents(ctx context.Context, src *plan.Source) ([]byte, error)
}

// Artifact is a fetched and verified download waiting to be installed.
// It holds nothing that needs releasing: what Fetch staged is a verified
// file in the download cache, which a rerun after a failure reuses and a
// successful apply prunes.
type Artifact interface {
	// Install puts the artifact's files into place at dest in root,
	// atomically per file. changed is false when every file already had
	// the wanted contents and mode.
	Install(ctx context.Context, root *confine.Root, dest string) (changed bool, err error)
}

// Host changes the running host (Packages, Modules, Sysctl, NftFlush and
// SwapOff steps). Each call is idempotent.
type Host interface {
	EnsurePackages(ctx context.Context, names []string, install bool) error
	LoadModules(ctx context.Context, names []string) error
	ApplySysctls(ctx context.Context, values []plan.KeyValue) error
	FlushNftables(ctx context.Context) error
	DisableSwap(ctx context.Context, fstab string) error
}

// Systemd is the host's service manager and machined, as apply uses them
// (status, reset and internal/machine each declare the few methods they
// call). The real one talks D-Bus (internal/systemd); tests use a fake.
type Systemd interface {
	// DaemonReload makes systemd read unit files again.
	DaemonReload(ctx context.Context) error
	// Enable enables unit; changed is false when it already was.
	Enable(ctx context.Context, unit string) (changed bool, err error)
	// Start starts unit and waits for the job's result; changed is false
	// when the unit was already active.
	Start(ctx context.Context, unit string) (changed bool, err error)
	// Restart restarts unit and waits for the job's result.
	Restart(ctx context.Context, unit string) error
	// Stop stops unit and waits for the job's result; stopping an inactive
	// or unknown unit is not an error.
	Stop(ctx context.Context, unit string) error
	// MachineRegistered reports whether machined knows the machine.
	MachineRegistered(ctx context.Context, machine string) (bool, error)
	// TerminateMachine asks machined to kill the machine.
	TerminateMachine(ctx context.Context, machine string) error
	// UnitState returns the ActiveState ("active", "activating",
	// "failed", ...) of unit inside the machine, or of a host unit when
	// machine is "".
	UnitState(ctx context.Context, machine, unit string) (string, error)
	// UnitRestarts returns how often systemd restarted unit inside the
	// machine (NRestarts) since the unit was loaded.
	UnitRestarts(ctx context.Context, machine, unit string) (int, error)
	// Journal returns the last lines of the machine's journal.
	Journal(ctx context.Context, machine string, lines int) (string, error)
	// UnitJournal returns the last lines a host unit logged.
	UnitJournal(ctx context.Context, unit string, lines int) (string, error)
}

var errNoDownloader = errors.New("no downloader configured")
