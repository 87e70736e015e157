package apply

import (
	"context"
	"net/http"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// What apply's tests reach inside the package. The tests are in package
// apply_test so that they share internal/applytest (which imports apply)
// with the tests of status and reset; this file, in package apply and
// compiled only with them, is their door in.

var (
	RegistryCredentialsIn = registryCredentials
	ValidatePlan          = Validate
	InstallBinary         = installBinary
)

const MaxWarnings = maxWarnings

// SetAfterStep sets the hook run after each step is recorded (done: how
// many steps have an outcome).
func SetAfterStep(o *Options, f func(done int)) { o.Hooks.AfterStep = f }

// SetCheckpoint sets the hook run between two changes of an upgrade's
// switch.
func SetCheckpoint(o *Options, f func(label string)) { o.Hooks.Checkpoint = f }

// WaitStep runs a wait step as the executor does, with opts' defaults.
func WaitStep(ctx context.Context, opts Options, w *plan.Wait) (state.Outcome, error) {
	e := &Executor{opts: WithDefaults(opts)}
	return e.wait(ctx, w)
}

// ScopeRel is path p inside the scope of root whose top is the plan path
// prefix, relative to root.
func ScopeRel(root *confine.Root, prefix, p string) (string, error) {
	return scope{root: root, prefix: prefix}.rel(p)
}

// ContentsDownloader is the real downloader's remote file contents
// through client.
func ContentsDownloader(client *http.Client) Downloader { return &downloader{client: client} }
