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
	if root == "" {
		root = "/"
	}
	if !filepath.IsAbs(binaryPath) && binaryPath != "" {
		return fmt.Errorf("install first-boot unit: binary path %q is not absolute", binaryPath)
	}
	host, err := openRoot(root)
	if err != nil {
		return fmt.Errorf("install first-boot unit: %w", err)
	}
	defer host.Close()
	unitPath := firstbootUnitPath
	if err := host.MkdirParents(path.Dir(unitPath)); err != nil {
		return fmt.Errorf("install first-boot unit: %w", err)
	}
	if err := host.WriteFile(unitPath, []byte(FirstbootUnit(binaryPath)), 0o644, 0, 0); err != nil {
		return fmt.Errorf("install first-boot unit: %w", err)
	}
	wants := layout.FirstbootWantsLink
	if err := host.MkdirParents(path.Dir(wants)); err != nil {
		return fmt.Errorf("enable first-boot unit: %w", err)
	}
	if err := host.Symlink(unitPath, wants, 0, 0); err != nil {
		return fmt.Errorf("enable first-boot unit: %w", err)
	}
	return nil
}
