package upgrade

import (
	"fmt"
)

// UpgradeError is an upgrade that did not leave the node on the new
// machine: it was rolled back (the node runs on the old machine again),
// or the rollback failed too.
type UpgradeError struct {
	From, To string
	// RolledBack is true when the node runs on From again.
	RolledBack bool
	Reason     error
	// RollbackErr is why the rollback failed.
	RollbackErr error
}

func (e *UpgradeError) Error() string {
	if e.RolledBack {
		return fmt.Sprintf("upgrade from %s to %s rolled back: %v; machine %s runs the node again", e.From, e.To, e.Reason, e.From)
	}
	return fmt.Sprintf("upgrade from %s to %s failed: %v; the rollback to %s failed too: %v", e.From, e.To, e.Reason, e.From, e.RollbackErr)
}

// Unwrap returns the reason.
func (e *UpgradeError) Unwrap() []error {
	if e.RollbackErr == nil {
		return []error{e.Reason}
	}
	return []error{e.Reason, e.RollbackErr}
}

// Refused marks e an apply.Refusal: nothing changed (exit code 2).
func (e *MachineExistsError) Refused() {}
