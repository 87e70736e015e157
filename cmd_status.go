package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/systemd"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/status"
)

// statusExit carries status's exit code (1 error, 2 degraded) without an
// error message of its own: the status line already said it.
type statusExit struct{ code int }

func (e statusExit) Error() string { return fmt.Sprintf("status exit %d", e.code) }

// statusPoll is how often --wait looks again.
const statusPoll = time.Second

// newStatusCmd is `nodespawn status`: where provisioning stands, in the
// shape cloud-init status has.
func newStatusCmd() *cobra.Command {
	var (
		root    string
		long    bool
		output  string
		wait    bool
		timeout time.Duration
		timings bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Say where provisioning stands: not run, running, done, error or degraded",
		Long: `status reads the result record of the last apply and looks at the machine
(registered with machined, containerd and kubelet active inside, and the host
services the node needs active: nvidia-fabricmanager on an NVSwitch GPU host)
and prints one line: not run, running: step X (n/m), done, error: step X:
reason, or degraded: applied, but ... (the machine, a node unit or such a host
service is down now, or the machine root composed from the layer store is
broken: a layer missing from the store or not as it was unpacked, its upper
directory gone; apply repairs it), and exits as cloud-init status does (below;
2 also for bad input, such as a --root that does not exist).

A run that succeeded but skipped steps (host settings and systemd on a --root
tree) or logged warnings says so after "done"; --long lists the skipped steps
by reason, the warnings and where the manifest was read from.

--wait blocks until the run ends, also when the first-boot unit has not
started yet, then exits with the code of the outcome. --long adds the digests,
the plan's version, start and end times, the failed step's whole error and the
first-boot unit's journal tail. --timings lists the steps by duration and the
critical path (what the whole run waited for), as systemd-analyze blame and
critical-chain do. -o json prints the same as JSON ("version":
"nodespawn.dev/status/v1").`,
		Example: `  nodespawn status
  nodespawn status --wait --long      # at the end of a cloud-init script
  nodespawn status --timings
  nodespawn status -o json | jq -r .summary`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return usageError{fmt.Errorf("-o %q: want text or json", output)}
			}
			ctx, cancel := signalContext()
			defer cancel()
			opts := status.Options{Root: root, Long: long, Timings: timings}
			if filepath.Clean(root) == "/" {
				opts.Systemd = systemd.New(nil)
			}
			st, err := readStatus(ctx, opts, wait, timeout)
			var missing *status.MissingRootError
			if errors.As(err, &missing) {
				return usageError{err}
			}
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(st); err != nil {
					return err
				}
			} else {
				writeStatus(cmd.OutOrStdout(), st, long)
			}
			if code := status.ExitCode(st); code != 0 {
				return statusExit{code}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&root, "root", "/", "read the state of the tree under this directory (no live look unless it is /)")
	f.BoolVar(&long, "long", false, "add digests, versions, times, the whole error and the first-boot journal tail")
	f.StringVarP(&output, "output", "o", "text", "text or json")
	f.BoolVar(&wait, "wait", false, "block until the run ends (or, at first boot, has started and ended)")
	f.DurationVar(&timeout, "timeout", 0, "with --wait, give up after this long (exit 1); 0 waits as long as it takes")
	f.BoolVar(&timings, "timings", false, "list the steps by duration and the critical path of the run")
	return cmd
}

// readStatus reads the status once, or with wait until the run has ended.
func readStatus(ctx context.Context, opts status.Options, wait bool, timeout time.Duration) (*status.Status, error) {
	var deadline <-chan time.Time
	if timeout > 0 {
		deadline = time.After(timeout)
	}
	for {
		st, err := status.Read(ctx, opts)
		if err != nil {
			return nil, err
		}
		if !wait || (st.State != status.StateRunning && !(st.State == status.StateNotRun && st.Pending)) {
			return st, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, fmt.Errorf("status --wait: still %q after %s", st.Summary, timeout)
		case <-time.After(statusPoll):
		}
	}
}

// writeStatus prints st for people.
func writeStatus(w io.Writer, st *status.Status, long bool) {
	fmt.Fprintln(w, st.Summary)
	if long {
		line := func(k, v string) {
			if v != "" {
				fmt.Fprintf(w, "%-13s %s\n", k+":", v)
			}
		}
		line("machine", st.Machine)
		line("previous", st.Previous)
		if u := st.Upgrade; u != nil {
			line("upgrade", fmt.Sprintf("%s -> %s, %s since %s", u.From, u.To, u.Phase, u.Started.Format(time.RFC3339)))
		}
		if l := st.LastUpgrade; l != nil {
			v := fmt.Sprintf("%s -> %s %s at %s", l.From, l.To, l.Outcome, l.Ended.Format(time.RFC3339))
			if l.PrepareMS > 0 {
				v += fmt.Sprintf("; prepared in %s", time.Duration(l.PrepareMS)*time.Millisecond)
			}
			if l.SwitchMS > 0 {
				v += fmt.Sprintf(", switched in %s", time.Duration(l.SwitchMS)*time.Millisecond)
			}
			if l.RollbackMS > 0 {
				v += fmt.Sprintf(", rolled back in %s", time.Duration(l.RollbackMS)*time.Millisecond)
			}
			if l.Reason != "" {
				v += " (" + firstLine(l.Reason) + ")"
			}
			line("last upgrade", v)
		}
		if st.RecordMachine != "" {
			line("last run", "for machine "+st.RecordMachine)
		}
		line("node", st.Node)
		line("manifest", st.ManifestDigest)
		line("source", st.SourceDigest)
		line("plan", strings.TrimSpace(st.PlanDigest+" "+st.PlanVersion))
		line("tool", st.ToolVersion)
		if st.Started != nil {
			line("started", st.Started.Format(time.RFC3339))
		}
		if st.Ended != nil {
			line("ended", fmt.Sprintf("%s (%s)", st.Ended.Format(time.RFC3339), st.Ended.Sub(*st.Started).Round(time.Millisecond)))
		}
		line("read from", st.Source)
		if st.Total > 0 {
			line("steps", fmt.Sprintf("%d/%d with an outcome", st.Finished, st.Total)+outcomeCounts(st.Outcomes))
		}
		for _, s := range st.Skipped {
			line("skipped", fmt.Sprintf("%d: %s\n%s", len(s.Steps), s.Reason, indent(strings.Join(s.Steps, "\n"))))
		}
		for _, w := range st.Warnings {
			line("warning", w)
		}
		for _, p := range st.RootProblems {
			line("broken", p.Detail)
		}
		for _, c := range st.Checks {
			mark := "ok"
			if !c.OK {
				mark = c.Detail
			}
			line("check", c.What+": "+mark)
		}
		if st.Step != nil && st.Step.Error != "" {
			fmt.Fprintf(w, "failed step %s (%s):\n%s\n", st.Step.ID, st.Step.Kind, indent(st.Step.Error))
		}
		if st.Journal != "" {
			fmt.Fprintf(w, "last lines of %s:\n%s\n", apply.FirstbootUnitName, indent(st.Journal))
		}
	}
	if t := st.Timings; t != nil {
		fmt.Fprintln(w, "steps by duration:")
		for _, s := range t.Blame {
			fmt.Fprintf(w, "  %10s  %s\n", s.Duration(), s.ID)
		}
		fmt.Fprintln(w, "critical path (what the run waited for):")
		for _, s := range t.CriticalPath {
			fmt.Fprintf(w, "  @%-10s %s (%s)\n", s.Start(), s.ID, s.Duration())
		}
	}
}

// outcomeCounts is ": 20 done, 15 unchanged, 8 skipped", in the order
// steps end up in.
func outcomeCounts(n map[state.Outcome]int) string {
	var parts []string
	for _, o := range []state.Outcome{state.OutcomeDone, state.OutcomeUnchanged, state.OutcomeSkipped, state.OutcomeFailed, state.OutcomePending} {
		if n[o] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n[o], o))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return ": " + strings.Join(parts, ", ")
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

func indent(s string) string {
	return "  " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n  ")
}
