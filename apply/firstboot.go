package apply

import (
	_ "embed"
	"fmt"
	"path"
	"path/filepath"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/state"
)

// FirstbootUnitName is the first-boot unit's name.
const FirstbootUnitName = layout.FirstbootUnit

// firstbootUnitPath is where InstallFirstboot puts the unit.
const firstbootUnitPath = layout.FirstbootUnitPath

// DefaultBinaryPath is where images and cloud-init put the nodespawn binary.
const DefaultBinaryPath = layout.BinaryPath

//go:embed firstboot.service
var firstbootTemplate string

//go:embed agent.service
var agentTemplate string

// AgentUnitName is the agent's unit (nodespawn agent).
const AgentUnitName = layout.AgentUnit

// AgentUnit returns the unit that runs `binaryPath agent` ("" means
// DefaultBinaryPath) on the host, always.
func AgentUnit(binaryPath string) string {
	if binaryPath == "" {
		binaryPath = DefaultBinaryPath
	}
	return strings.NewReplacer("{{BINARY}}", binaryPath, "{{FIRSTBOOT}}", layout.FirstbootUnit).Replace(agentTemplate)
}

// InstallAgent writes the agent's unit under root ("" means "/") and
// enables it as InstallFirstboot does its unit. A live host needs a
// daemon-reload and a start (or a reboot) before it runs.
func InstallAgent(root, binaryPath string) error {
	return installUnit(root, binaryPath, layout.AgentUnitPath, layout.AgentWantsLink, AgentUnit(binaryPath), "agent unit")
}

// FirstbootUnit returns the first-boot unit that runs binaryPath
// ("" means DefaultBinaryPath) until a run has succeeded once.
func FirstbootUnit(binaryPath string) string {
	if binaryPath == "" {
		binaryPath = DefaultBinaryPath
	}
	return strings.NewReplacer("{{BINARY}}", binaryPath, "{{DONE}}", state.DoneStamp).Replace(firstbootTemplate)
}

// InstallFirstboot writes the first-boot unit under root ("" means "/")
// and enables it the way systemctl enable would, with a wants-symlink, so
// it works on an image tree as well as on a live host. A live host needs a
// daemon-reload before the unit can be started by hand.
func InstallFirstboot(root, binaryPath string) error {
	return installUnit(root, binaryPath, firstbootUnitPath, layout.FirstbootWantsLink, FirstbootUnit(binaryPath), "first-boot unit")
}

// installUnit writes unit at unitPath under root and enables it with the
// link wants.
func installUnit(root, binaryPath, unitPath, wants, unit, what string) error {
	if root == "" {
		root = "/"
	}
	if !filepath.IsAbs(binaryPath) && binaryPath != "" {
		return fmt.Errorf("install %s: binary path %q is not absolute", what, binaryPath)
	}
	host, err := openRoot(root)
	if err != nil {
		return fmt.Errorf("install %s: %w", what, err)
	}
	defer host.Close()
	if err := host.MkdirParents(path.Dir(unitPath)); err != nil {
		return fmt.Errorf("install %s: %w", what, err)
	}
	if err := host.WriteFile(unitPath, []byte(unit), 0o644, 0, 0); err != nil {
		return fmt.Errorf("install %s: %w", what, err)
	}
	if err := host.MkdirParents(path.Dir(wants)); err != nil {
		return fmt.Errorf("enable %s: %w", what, err)
	}
	if err := host.Symlink(unitPath, wants, 0, 0); err != nil {
		return fmt.Errorf("enable %s: %w", what, err)
	}
	return nil
}
