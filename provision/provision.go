// Package provision is the pipeline every entry point runs: the CLI's
// apply, render and validate, the first-boot unit (apply --first-boot) and
// any future agent. It reads the manifest from its source (a file, stdin,
// user-data from a datasource), validates it, gathers the host's facts,
// renders the plan, and then prints it (a dry run: the plan, or the change
// against the applied one and what apply will do), applies it in place, or
// upgrades by alternating machines, refusing what it must (another node, a
// changed manifest where no upgrade is possible) before anything changes.
//
// Around the one run (Run.Once) it adds the first boot's retries of
// transient failures, its console line and report (Run.FirstBoot), and the
// options for finishing or undoing a switch with no manifest given
// (StoredOptions). Package main keeps only flags, help and exit codes.
package provision

import (
	"errors"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/render"
)

// InputError marks bad input (a flag, a source, a facts file): exit
// code 2, like a manifest or render error.
type InputError struct{ error }

// Unwrap is the error it marks.
func (e InputError) Unwrap() error { return e.error }

// ExitCode maps an error of the pipeline to the process exit code: 2 for
// bad input (the manifest, a facts file, what render refuses for this
// host, a manifest apply refuses here), 1 for what failed, 0 for nil.
func ExitCode(err error) int {
	var (
		merr manifest.Errors
		rerr *render.Error
		ierr InputError
		eerr ExitError
	)
	switch {
	case err == nil:
		return apply.ExitOK
	case errors.As(err, &eerr):
		return eerr.ExitCode()
	case errors.As(err, &merr), errors.As(err, &rerr), errors.As(err, &ierr):
		return apply.ExitInput
	}
	// apply knows its own bad input: a manifest other than the applied one.
	return apply.ExitCode(err)
}
