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

// ManifestChangedError is returned when the record names another manifest
// than the one given and Options.Force is not set.
type ManifestChangedError struct {
	Applied, Given string
	Record         string
}

func (e *ManifestChangedError) Error() string {
	return fmt.Sprintf("refusing to apply manifest %s: this host was provisioned from manifest %s (record %s); "+
		"run nodespawn reset first, or pass --force to apply the new manifest over the old one", e.Given, e.Applied, e.Record)
}

// LockedError is returned when another apply or reset held the lock for
// longer than Options.LockTimeout.
type LockedError struct {
	Path   string
	Holder string
}

func (e *LockedError) Error() string {
	return fmt.Sprintf("another nodespawn is running (lock %s held by %s); wait for it to finish and run again", e.Path, e.Holder)
}

// Exit codes, as the CLI reports them.
const (
	ExitOK     = 0 // applied, or already applied
	ExitFailed = 1 // a step or the engine failed
	ExitInput  = 2 // the input was refused (bad manifest, flags; a changed manifest without --force)
)

// ExitCode maps Run's error to the process exit code: 0 for nil (applied or
// already applied), 2 for a manifest refused because another one was
// applied, 1 for everything else. Errors the caller finds in the input
// before calling Run (manifest, flags) are the caller's to map to 2.
func ExitCode(err error) int {
	var changed *ManifestChangedError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &changed):
		return ExitInput
	default:
		return ExitFailed
	}
}
