// Package e2e boots a real VM (qemu, TCG) with a real systemd, hands it a
// nodespawn manifest as NoCloud user-data, and checks the node that comes up
// inside its systemd-nspawn machine.
//
// The tests are behind the build tag "e2e" and need root; run them with
// `make e2e`, which builds the test binary and runs it inside a private
// network namespace that has only a loopback interface. See README.md.
package e2e
