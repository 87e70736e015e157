package apply

import (
	"errors"
	"fmt"

	"github.com/nodespawn/nodespawn/plan"
)

// StepError is a step that failed. Its message names the step; the wrapped
// error names the path, URL or command and what it reported.
type StepError struct {
	ID   string
	Kind plan.Kind
	Err  error
}

func (e *StepError) Error() string {
	return fmt.Sprintf("step %s (%s): %v", e.ID, e.Kind, e.Err)
}

// Unwrap returns the step's own error.
func (e *StepError) Unwrap() error { return e.Err }

// loggedError is an error Run has logged already, in full, where it
// happened (the failed step's line, or "apply failed"): the CLI prints it
// once, not again as its last word.
type loggedError struct{ error }

func (e loggedError) Unwrap() error { return e.error }

// Logged says whether err was logged in full by Run.
func Logged(err error) bool {
	var l loggedError
	return errors.As(err, &l)
}

// ManifestChangedError is returned when the node was made from another
// manifest than the one given and Run may not change it: the first boot
// never upgrades, a tree that is not a running host cannot switch
// machines, and a node whose first run never finished is not replaced
// without Options.Force.
type ManifestChangedError struct {
	Applied, Given string
	Record         string
	// Machine is the machine made from Applied.
	Machine string
	// FirstBoot is set when the refusal is the first boot's.
	FirstBoot bool
	// CanUpgrade is set when a plain apply would upgrade.
	CanUpgrade bool
}

func (e *ManifestChangedError) Error() string {
	switch {
	case e.FirstBoot:
		return fmt.Sprintf("not applying manifest %s at first boot: machine %s runs this node from manifest %s (record %s); "+
			"the first boot never upgrades: run nodespawn apply -f with the new manifest to upgrade", e.Given, e.Machine, e.Applied, e.Record)
	case e.CanUpgrade:
		return fmt.Sprintf("refusing to apply manifest %s: machine %s was made from manifest %s and its first run never finished (record %s); "+
			"run nodespawn reset first, or pass --force to apply the new manifest over it", e.Given, e.Machine, e.Applied, e.Record)
	}
	return fmt.Sprintf("refusing to apply manifest %s: this host was provisioned from manifest %s (record %s); "+
		"run nodespawn reset first, or pass --force to apply the new manifest over the old one", e.Given, e.Applied, e.Record)
}

// Exit codes, as the CLI reports them.
const (
	ExitOK     = 0 // applied, or already applied
	ExitFailed = 1 // a step or the engine failed
	ExitInput  = 2 // the input was refused (bad manifest, flags; a changed manifest without --force)
)

// ExitCode maps Run's error to the process exit code: 0 for nil (applied or
// already applied), 2 for what was refused before anything changed (a
// manifest other than the applied one where no upgrade is possible, an
// upgrade onto a machine nodespawn did not make, a rollback with nothing
// to roll back to), 1 for everything else (a failed step, an upgrade
// rolled back). Errors the caller finds in the input
// before calling Run (manifest, flags) are the caller's to map to 2.
func ExitCode(err error) int {
	var refused Refusal
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &refused):
		return ExitInput
	default:
		return ExitFailed
	}
}

// A Refusal is an error that refused a run before anything changed
// (ExitInput): a manifest other than the applied one where no upgrade is
// possible (*ManifestChangedError), an upgrade onto a machine nodespawn
// did not make (upgrade's *MachineExistsError), nothing to roll back to
// (state's *NoRollbackError).
type Refusal interface {
	error
	Refused()
}

// Refused marks e a Refusal.
func (e *ManifestChangedError) Refused() {}
