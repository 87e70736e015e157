// Package hostprep prepares the host for an nspawn machine: kernel modules,
// sysctls, the nftables ruleset, swap and host packages. Each function does
// one idempotent thing that the apply engine calls from a plan step; a second
// call with the same input changes nothing.
//
// Order matters and is the caller's: LoadModules (overlay, br_netfilter) must
// run before ApplySysctls, because the net.bridge.* keys exist only once
// br_netfilter is loaded.
package hostprep

import (
	"context"
	"log/slog"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/plan"
)

// Host is the host apply's host steps change: the running system at Root
// "/", or a tree under another Root for the steps that only touch files
// (sysctls under Root/proc/sys, swap entries in Root's fstab). Its methods
// are the apply.Host seam.
type Host struct {
	// Root is the host's root directory; "" means "/".
	Root string
	// NetNS, when set, is the network namespace (/run/netns/NAME) whose
	// nftables ruleset FlushNftables empties instead of the caller's own.
	NetNS string
	// Log receives what each step changed; nil means slog.Default().
	Log *slog.Logger
}

func (h Host) root() string {
	if h.Root == "" {
		return "/"
	}
	return h.Root
}

func (h Host) log() *slog.Logger {
	if h.Log == nil {
		return slog.Default()
	}
	return h.Log
}

// EnsurePackages makes sure the named Debian packages are installed on the
// host. Missing ones are installed with apt-get when install is true (the
// manifest's host.installPackages); otherwise the error names them and the
// field that allows installing them. apt-get waits for the dpkg lock and is
// retried with `apt-get update` and a growing pause when it fails for a
// reason that may pass.
func (h Host) EnsurePackages(ctx context.Context, names []string, install bool) error {
	return ensurePackages(ctx, h.log(), command.Exec{}, aptRetry, names, install)
}

// LoadModules loads the named kernel modules with modprobe. A module already
// present under /sys/module is not loaded again. When any module fails, the
// error lists every failing module with modprobe's stderr.
//
// Call it before ApplySysctls: the net.bridge.* sysctls appear only once
// br_netfilter is loaded.
func (h Host) LoadModules(ctx context.Context, names []string) error {
	return loadModules(ctx, command.Exec{}, "/sys/module", names)
}

// ApplySysctls sets values under Root/proc/sys now; see applySysctls.
func (h Host) ApplySysctls(_ context.Context, values []plan.KeyValue) error {
	return applySysctls(h.log(), h.root(), values)
}

// FlushNftables removes the whole nftables ruleset (every table, chain, set
// and rule of every family) of the caller's network namespace, or of NetNS,
// through netlink, as `nft flush ruleset` does. The spec requires an empty
// host ruleset so the machine's kube-proxy and CNI own packet filtering.
func (h Host) FlushNftables(ctx context.Context) error {
	if h.NetNS != "" {
		return flushNftablesIn(ctx, h.log(), h.NetNS)
	}
	return flushNftables(ctx, h.log(), "current network namespace")
}

// DisableSwap turns off every active swap area and comments out the swap
// entries of the fstab at Root/fstab; see disableSwap.
func (h Host) DisableSwap(ctx context.Context, fstab string) error {
	return disableSwap(ctx, h.log(), h.root(), fstab, swapoff)
}
