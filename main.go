// Command nodespawn turns a declarative manifest into a Kubernetes worker
// node isolated inside a systemd-nspawn machine, applied once at first boot.
//
// Exit codes: 0 done (or already applied), 1 a step failed, 2 bad input
// (manifest, flags, or a manifest this host cannot satisfy).
package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/journal"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/provision"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes.
const (
	exitOK       = 0
	exitFailed   = 1
	exitBadInput = 2
)

// usageError marks a bad flag or argument: exit code 2.
type usageError struct{ error }

func main() {
	if os.Getenv("GOGC") == "" && shortRun(os.Args[1:]) {
		// A short run (a dry run, status, validate) allocates a few MiB
		// while starting: the default goal (4 MiB) collects two or three
		// times for nothing, ~3 ms of a dry run. A long one (apply
		// unpacking layers, the agent running for days) keeps the
		// default, and its memory with it.
		debug.SetGCPercent(shortRunGCPercent)
	}
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, stderr()))
}

// shortRunGCPercent is the GC percent of the commands shortRun picks.
const shortRunGCPercent = 400

// shortRun says whether the command line is one of the commands that
// answer and exit: those that only read and print, and apply --dry-run.
func shortRun(args []string) bool {
	if len(args) == 0 {
		return true
	}
	switch args[0] {
	case "version", "--version", "validate", "status", "schema", "facts", "config", "help", "-h", "--help",
		"completion", cobra.ShellCompRequestCmd, cobra.ShellCompNoDescRequestCmd, "render":
		return true
	case "apply":
		return slices.Contains(args[1:], "--dry-run")
	}
	return false
}

// stderr is where logs and errors go: on a terminal, the one writer that
// progress bars are drawn through too, so log lines print above the bars
// and no redraw erases them.
func stderr() io.Writer {
	if t := progress.Stderr(); t != nil {
		return t
	}
	return os.Stderr
}

// run executes the command line and returns the exit code; main is thin so
// tests can drive the CLI in-process.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	root := newRootCmd(stdin, stdout, stderr)
	if len(args) > 0 && (args[0] == cobra.ShellCompRequestCmd || args[0] == cobra.ShellCompNoDescRequestCmd) {
		// Only a shell asking for completions needs the value
		// completions; registering them on every command costs ~1 ms
		// of every start (see make bench-startup).
		completeFlags(root)
	}
	root.SetArgs(args)
	var ran bool
	markRunning(root, &ran)
	cmd, err := root.ExecuteC()
	if t, ok := stderr.(*progress.Terminal); ok {
		// Bars of transfers a failure left unfinished go; what is
		// printed last is the outcome.
		t.Close()
	}
	if err == nil {
		return exitOK
	}
	var se statusExit
	if errors.As(err, &se) {
		// status printed its line; the code is the answer.
		return se.code
	}
	var de provision.ExitError
	if errors.As(err, &de) {
		// The dry run printed the plan and apply's decision.
		return de.ExitCode()
	}
	code := exitCode(err)
	if apply.Logged(err) {
		// Its line is in the log already (a failed step's, with the
		// error): said once.
		return code
	}
	if !ran {
		// Cobra refused the command line before any command ran: an
		// unknown command, extra arguments, a missing required flag.
		code = exitBadInput
		err = usageError{err}
	}
	var merr manifest.Errors
	if errors.As(err, &merr) {
		// Every problem, each with its position and snippet.
		msg := merr.Error()
		if !strings.HasSuffix(msg, "\n") {
			msg += "\n"
		}
		fmt.Fprint(stderr, msg)
		if n := len(merr); n > 1 {
			fmt.Fprintf(stderr, "%d problems found\n", n)
		}
	} else {
		fmt.Fprintf(stderr, "nodespawn: %v\n", err)
	}
	if errors.As(err, new(usageError)) || errors.As(err, new(provision.InputError)) {
		fmt.Fprintln(stderr, usageHint(cmd))
	}
	return code
}

func exitCode(err error) int {
	if errors.As(err, new(usageError)) {
		return exitBadInput
	}
	return provision.ExitCode(err)
}

// addTemplateFuncs adds the help template's functions to cobra's global
// map, once: tests build root commands concurrently.
var addTemplateFuncs = sync.OnceFunc(func() {
	cobra.AddTemplateFunc("exitCodes", commandExitCodes)
})

func newRootCmd(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	var logLevel string
	root := &cobra.Command{
		Use:   "nodespawn",
		Short: "Turn a manifest into a Kubernetes node inside a systemd-nspawn machine",
		Long: `nodespawn reads a manifest (YAML or JSON), validates it against its JSON Schema,
renders a plan of everything needed to run a Kubernetes worker node inside a
systemd-nspawn machine on this host, applies the plan once, and exits.

  nodespawn validate -f node.yaml          check a manifest, every problem at once
  nodespawn apply --dry-run -f node.yaml   print the plan, touch nothing
  nodespawn apply -f node.yaml             make this host a node; on a node,
                                           upgrade it to this manifest
  nodespawn status                         where provisioning or an upgrade stands
  nodespawn rollback                       back to the machine the last upgrade replaced
  nodespawn schema > nodespawn.schema.json the JSON Schema, for editors`,
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			return setupLogging(stderr, logLevel)
		},
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.SetVersionTemplate(versionText())
	addTemplateFuncs()
	root.SetHelpTemplate(root.HelpTemplate() + helpExitCodes)
	root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	root.AddCommand(
		newApplyCmd(false),
		newApplyCmd(true),
		newValidateCmd(),
		newSchemaCmd(),
		newFactsCmd(),
		newResetCmd(),
		newRollbackCmd(),
		newStatusCmd(),
		newInstallCmd(),
		newImageCmd(),
		newConfigCmd(),
		newAgentCmd(),
		newVersionCmd(),
		newMountRootCmd(),
	)
	return root
}

// setupLogging installs the one logger: the journal's native protocol with
// structured fields when stderr is the journal, logfmt key=value lines
// otherwise: with timestamps on a terminal and into a regular file, without
// them into a pipe or socket (the journal or a CI log adds its own).
func setupLogging(w io.Writer, level string) error {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", level)}
	}
	if f, ok := w.(*os.File); ok && f == os.Stderr && journal.UnderJournal() {
		// Under systemd: every attribute a journal field as well.
		slog.SetDefault(slog.New(journal.NewHandler(l)))
		return nil
	}
	opts := &slog.HandlerOptions{Level: l}
	if !timestamped(w) {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(w, opts)))
	return nil
}

// timestamped says whether log lines to w carry their time: on a terminal
// and into a regular file (2>run.log), where nothing else records when a
// line was written. A pipe or socket leads to something that stamps lines
// itself (the journal, a CI log).
func timestamped(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || term.IsTerminal(int(f.Fd())) {
		return true // the shared Terminal, or a writer of the caller's
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode().IsRegular()
}
