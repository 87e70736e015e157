package apply

import (
	"context"
	"time"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// Defaults for UpgradeOptions.
const (
	DefaultUpgradeStopTimeout  = layout.DefaultStopTimeout
	DefaultUpgradeReadyTimeout = layout.DefaultReadyTimeout
	// DefaultRestartLimit is how many kubelet or containerd restarts in
	// the new machine fail a switch at once.
	DefaultRestartLimit = 4
)

// UpgradeOptions configure upgrades by alternating machines.
type UpgradeOptions struct {
	// Render renders the manifest for one machine of its pair. Without
	// it, a changed manifest is refused (or, with Force, applied in place).
	Render func(machine string) (*plan.Plan, error)
	// NodeReady returns once the node p describes is Ready as the API
	// server sees it, with a heartbeat after since, or with ctx's error
	// (and what it last saw). nil verifies a switch by the machine's
	// units alone.
	NodeReady func(ctx context.Context, p *plan.Plan, since time.Time) error
	// Refuse makes a changed manifest an error, never an upgrade (the
	// first boot).
	Refuse bool
	// StopTimeout bounds a machine's stop before it is terminated.
	StopTimeout time.Duration
	// ReadyTimeout bounds the wait for the new machine (and, in a
	// rollback, the old one) to run the node again.
	ReadyTimeout time.Duration
	// RestartLimit is how many restarts of containerd or kubelet in the
	// new machine fail the switch without waiting longer.
	RestartLimit int
}

func (u UpgradeOptions) withDefaults() UpgradeOptions {
	if u.StopTimeout <= 0 {
		u.StopTimeout = DefaultUpgradeStopTimeout
	}
	if u.ReadyTimeout <= 0 {
		u.ReadyTimeout = DefaultUpgradeReadyTimeout
	}
	if u.RestartLimit <= 0 {
		u.RestartLimit = DefaultRestartLimit
	}
	return u
}
