package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/manifest"
)

// TestUsageErrorsExit2: whatever cobra refuses before a command runs is
// bad input, exit 2, with the error and where the help is.
func TestUsageErrorsExit2(t *testing.T) {
	for _, args := range [][]string{
		{"bogus"},            // unknown command
		{"version", "extra"}, // extra arguments
		{"apply", "--dry-run", "extra", "-f", "examples/minimal.yaml"},
		{"status", "--timeout", "soon"}, // a bad flag value
		{"--log-level", "loud", "version"},
		{"image", "build", "--rootfs"}, // a flag without its value
	} {
		code, out, errOut := cli(t, "", args...)
		if code != exitBadInput || !strings.Contains(errOut, "--help' for usage") {
			t.Errorf("%q: exit %d, want %d with a pointer to the help\nstdout: %s\nstderr: %s", args, code, exitBadInput, out, errOut)
		}
	}
}

func TestVersion(t *testing.T) {
	code, flag, _ := cli(t, "", "--version")
	_, cmd, _ := cli(t, "", "version")
	if code != exitOK || flag != cmd || !strings.Contains(flag, "manifest "+manifest.APIVersion) {
		t.Errorf("--version: exit %d, %q; version printed %q", code, flag, cmd)
	}
	code, out, errOut := cli(t, "", "version", "-o", "json")
	var v versionInfo
	if err := json.Unmarshal([]byte(out), &v); code != exitOK || err != nil || v.Version != version || v.Manifest != manifest.APIVersion || v.Plan == "" {
		t.Errorf("version -o json: exit %d, %v: %s%s", code, err, out, errOut)
	}
}

// TestHelpListsExitCodes: every command that runs says its exit codes.
func TestHelpListsExitCodes(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Runnable() && !c.Hidden {
			path := strings.Fields(c.CommandPath())[1:]
			code, out, errOut := cli(t, "", append(path, "--help")...)
			if code != exitOK || !strings.Contains(out, "\nExit codes:\n  0  ") {
				t.Errorf("%s --help: exit %d, no exit codes:\n%s%s", c.CommandPath(), code, out, errOut)
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(newRootCmd(nil, nil, nil))
}

// TestFlagValuesComplete asks the completion the shells ask
// (`nodespawn __complete ARGS... PARTIAL`).
func TestFlagValuesComplete(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"apply", "-o", ""}, []string{"text", "json"}},
		{[]string{"status", "--output", "j"}, []string{"json"}},
		{[]string{"version", "-o", ""}, []string{"text", "json"}},
		{[]string{"apply", "--source", ""}, []string{"auto", "nocloud", "azure", "cloud-init"}},
		{[]string{"status", "--log-level", ""}, []string{"debug", "info", "warn", "error"}},
	} {
		code, out, errOut := cli(t, "", append([]string{cobra.ShellCompRequestCmd}, tc.args...)...)
		var got []string
		for _, l := range strings.Split(out, "\n") {
			if l != "" && !strings.HasPrefix(l, ":") {
				got = append(got, l)
			}
		}
		if code != exitOK || !slices.Equal(got, tc.want) {
			t.Errorf("complete %q: exit %d, %q, want %q (%s)", tc.args, code, got, tc.want, errOut)
		}
	}
}
