package main

import (
	"encoding/json"
	"fmt"
	"runtime"
	"strings"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// The conventions every command follows, in one place: the exit codes its
// help lists, the completion of flag values, usage errors as exit 2.

// exitCodes is what each command's exit codes mean, by command path; a
// command not listed has defaultExitCodes. Each command's help ends with
// them.
var exitCodes = map[string]string{
	"nodespawn": defaultExitCodes,
	"nodespawn apply": `  0  done or already applied; with --dry-run, the plan printed
  1  a step failed, or an upgrade's new machine did not run the node
     (the old one runs it again); run apply again to resume
  2  bad input: flags, arguments, the manifest, a manifest this host
     cannot satisfy, or one for another node (reset first); with
     --dry-run, also when apply would refuse the manifest
  With --dry-run --detailed-exitcode (Terraform's plan convention):
  0  no changes, 1 an error (bad input and refusals included),
  2  changes to apply`,
	"nodespawn validate": `  0  the manifest is valid
  2  it is not (every problem printed), or bad flags or arguments`,
	"nodespawn status": `  0  done (also running or not run, without --wait)
  1  error (also --wait that timed out)
  2  degraded: applied, but the machine, a node unit or a host service
     it needs is down now, or its root is broken (apply repairs it);
     or bad input: flags, arguments, a --root that does not exist
  (as cloud-init status gives them)`,
	"nodespawn rollback": `  0  rolled back
  1  the previous machine did not run the node (the node runs where it was)
  2  nothing to roll back to, or bad flags or arguments`,
	"nodespawn reset": `  0  removed (with --dry-run: the list printed)
  1  something could not be removed (the error names it), or the
     question on the terminal was not answered yes
  2  nothing applied to reset, stdin is not a terminal and --yes was
     not given, or bad flags or arguments`,
}

const defaultExitCodes = `  0  done
  1  failed
  2  bad input: flags, arguments, or a manifest`

// helpExitCodes ends every command's help with its exit codes.
const helpExitCodes = `{{with exitCodes .}}
Exit codes:
{{.}}
{{end}}`

// commandExitCodes is the help template's exitCodes: the command's exit
// codes, none for a command that only groups others.
func commandExitCodes(c *cobra.Command) string {
	if s, ok := exitCodes[c.CommandPath()]; ok {
		return s
	}
	if c.Runnable() {
		return defaultExitCodes
	}
	return ""
}

// flagValues are the values a flag takes, for shell completion, by flag
// name; the same name means the same thing on every command.
var flagValues = map[string][]cobra.Completion{
	"output":    {"text", "json"},
	"log-level": {"debug", "info", "warn", "error"},
	// A path completes as a file too (see completeFlags).
	"source": {"auto", "nocloud", "azure", "cloud-init"},
}

// completeFlags registers the completion of flag values: the fixed values
// of flagValues, manifest files for -f, directories for trees.
func completeFlags(c *cobra.Command) {
	register := func(name string, fn cobra.CompletionFunc) {
		if c.Flags().Lookup(name) != nil || c.PersistentFlags().Lookup(name) != nil {
			// Registered once per command that defines the flag.
			if _, ok := c.GetFlagCompletionFunc(name); !ok {
				c.RegisterFlagCompletionFunc(name, fn)
			}
		}
	}
	for name, values := range flagValues {
		dir := cobra.ShellCompDirectiveNoFileComp
		if name == "source" {
			dir = cobra.ShellCompDirectiveDefault
		}
		register(name, func(_ *cobra.Command, _ []string, prefix string) ([]cobra.Completion, cobra.ShellCompDirective) {
			var match []cobra.Completion
			for _, v := range values {
				if strings.HasPrefix(v, prefix) {
					match = append(match, v)
				}
			}
			return match, dir
		})
	}
	for _, name := range []string{"file", "facts"} {
		if f := c.LocalNonPersistentFlags().Lookup(name); f != nil {
			c.MarkFlagFilename(name, "yaml", "yml", "json")
		}
	}
	for _, name := range []string{"root", "rootfs", "layout"} {
		if f := c.LocalNonPersistentFlags().Lookup(name); f != nil {
			c.MarkFlagDirname(name)
		}
	}
	for _, sub := range c.Commands() {
		completeFlags(sub)
	}
}

// markRunning records in *ran that a command's RunE began: an error
// before that (an unknown command, extra arguments, a missing required
// flag) is a usage error, exit 2.
func markRunning(c *cobra.Command, ran *bool) {
	if run := c.RunE; run != nil {
		c.RunE = func(cmd *cobra.Command, args []string) error {
			*ran = true
			return run(cmd, args)
		}
	}
	for _, sub := range c.Commands() {
		markRunning(sub, ran)
	}
}

// versionText is what `nodespawn version` and `nodespawn --version` print.
func versionText() string {
	return fmt.Sprintf("nodespawn %s\nmanifest %s\nplan %s\n", version, manifest.APIVersion, plan.Version)
}

// versionInfo is `nodespawn version -o json`.
type versionInfo struct {
	Version  string `json:"version"`
	Manifest string `json:"manifestAPIVersion"`
	Plan     string `json:"planVersion"`
	Go       string `json:"goVersion"`
	Platform string `json:"platform"`
}

func newVersionCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the nodespawn version and the manifest and plan formats it understands",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch output {
			case "text":
				fmt.Fprint(cmd.OutOrStdout(), versionText())
				return nil
			case "json":
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(versionInfo{
					Version: version, Manifest: manifest.APIVersion, Plan: plan.Version,
					Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH,
				})
			}
			return usageError{fmt.Errorf("-o %q: want text or json", output)}
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text or json")
	return cmd
}

// usageHint is the line after a usage error: where the command's help is.
func usageHint(c *cobra.Command) string {
	if c == nil {
		return "Run 'nodespawn --help' for usage."
	}
	return fmt.Sprintf("Run '%s --help' for usage.", strings.TrimSpace(c.CommandPath()))
}
