package plan

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/pmezard/go-difflib/difflib"
)

// DiffVersion identifies the JSON shape of a Diff.
const DiffVersion = "nodespawn.dev/plan-diff/v1"

// Diff is what a plan changes against another (the applied one): steps
// matched by id, added, removed or changed. It is computed on redacted
// plans; a changed secret shows as a changed digest, never its contents.
type Diff struct {
	Version string `json:"version"`
	// From and To are the machines and digests of the two plans.
	From Side `json:"from"`
	To   Side `json:"to"`
	// Added and Removed are step ids, in plan order.
	Added   []string `json:"added"`
	Removed []string `json:"removed"`
	Changed []Change `json:"changed"`
	// AddedSteps are the added steps themselves, redacted (a secret
	// file's contents are Redacted), in the order of Added: what apply
	// will create. RemovedSteps say what apply does about each removed
	// step, in the order of Removed. Both were added within v1.
	AddedSteps   []Step        `json:"addedSteps"`
	RemovedSteps []RemovedStep `json:"removedSteps"`
	// Unchanged counts the steps that are the same in both.
	Unchanged int `json:"unchanged"`
	// Upgrade, when set, says the change is applied by preparing the other
	// machine of the pair and switching to it (the caller fills it in: it
	// depends on the host's state, not on the two plans).
	Upgrade *UpgradeNote `json:"upgrade,omitempty"`
	// Apply is what apply will do with the new plan on this host: the
	// decision apply itself makes (the caller fills it in; added within
	// v1).
	Apply *ApplyNote `json:"apply,omitempty"`
}

// ApplyNote is what apply will do with a plan on a host.
type ApplyNote struct {
	// Action is apply's: "apply", "resume", "replace", "already
	// applied", "converge", "force", "upgrade" or "refuse".
	Action string `json:"action"`
	// Summary says it in a sentence; for a refusal, why.
	Summary string `json:"summary"`
	// ExitCode is apply's exit code when it refuses (0 otherwise).
	ExitCode int `json:"exitCode"`
}

// UpgradeNote is how a change would be applied: an upgrade from the
// running machine to the other one.
type UpgradeNote struct {
	From string `json:"from"`
	To   string `json:"to"`
	// StopTimeout and ReadyTimeout are the manifest's upgrade settings.
	StopTimeout  string `json:"stopTimeout"`
	ReadyTimeout string `json:"readyTimeout"`
	// Refused is why apply would refuse it ("" when it would not).
	Refused string `json:"refused,omitempty"`
}

// Side is one plan of a Diff.
type Side struct {
	Machine  string `json:"machine"`
	NodeName string `json:"nodeName"`
	Digest   string `json:"digest,omitempty"`
}

// Change is one step that both plans have, changed.
type Change struct {
	ID string `json:"id"`
	// Fields are the parts that differ: "summary", "after", or the
	// payload's fields ("file.contents", "file.mode", "download.url", ...).
	Fields []string `json:"fields"`
	// Values are the old and new value of each of Fields, in the same
	// order (added within v1). A secret file's contents and digest are
	// Redacted on both sides: that they changed is all the diff says.
	Values []FieldChange `json:"values"`
	// Unified is the unified diff of a text file's contents.
	Unified string `json:"unified,omitempty"`
}

// FieldChange is one changed field of a step: its value in the applied
// plan and in the new one, as in the plan's JSON (null when absent).
type FieldChange struct {
	Field string `json:"field"`
	Old   any    `json:"old"`
	New   any    `json:"new"`
	// Base64 is set when the values are a binary file's contents, base64.
	Base64 bool `json:"base64,omitempty"`
}

// RemovedStep is a step of the applied plan that the new plan lacks, and
// what apply does about it: apply never undoes a step, so what a removed
// step made stays where it is, except that an upgrade builds the new
// machine without it.
type RemovedStep struct {
	ID      string `json:"id"`
	Phase   Phase  `json:"phase"`
	Kind    Kind   `json:"kind"`
	Summary string `json:"summary"`
	// Effect says what becomes of what the step made.
	Effect string `json:"effect"`
}

// Empty reports whether the plans do the same.
func (d *Diff) Empty() bool { return len(d.Added)+len(d.Removed)+len(d.Changed) == 0 }

// Compare returns what to changes against from (the applied plan as
// stored). Both are redacted first, keeping the digests of secrets, so the
// result may be printed: a changed secret is named, its contents never.
func Compare(from, to *Plan) *Diff {
	d := &Diff{Version: DiffVersion,
		From:  Side{Machine: from.Machine, NodeName: from.NodeName},
		To:    Side{Machine: to.Machine, NodeName: to.NodeName, Digest: to.Digest()},
		Added: []string{}, Removed: []string{}, Changed: []Change{},
		AddedSteps: []Step{}, RemovedSteps: []RemovedStep{}}
	from, to = from.RedactKeepingDigests(), to.RedactKeepingDigests()
	old := map[string]*Step{}
	for i := range from.Steps {
		old[from.Steps[i].ID] = &from.Steps[i]
	}
	seen := map[string]bool{}
	for i := range to.Steps {
		s := &to.Steps[i]
		seen[s.ID] = true
		o, ok := old[s.ID]
		if !ok {
			d.Added = append(d.Added, s.ID)
			d.AddedSteps = append(d.AddedSteps, *s)
			continue
		}
		values := changedValues(o, s)
		if len(values) == 0 {
			d.Unchanged++
			continue
		}
		c := Change{ID: s.ID, Values: values}
		for _, v := range values {
			c.Fields = append(c.Fields, v.Field)
		}
		if o.File != nil && s.File != nil && !s.File.Secret && o.File.Encoding == "" && s.File.Encoding == "" && o.File.Contents != s.File.Contents {
			c.Unified = unified(o.File.Contents, s.File.Contents)
		}
		d.Changed = append(d.Changed, c)
	}
	for _, s := range from.Steps {
		if !seen[s.ID] {
			d.Removed = append(d.Removed, s.ID)
			d.RemovedSteps = append(d.RemovedSteps, RemovedStep{ID: s.ID, Phase: s.Phase, Kind: s.Kind, Summary: s.Summary})
		}
	}
	d.describeRemoved()
	return d
}

// describeRemoved says what apply does about each removed step, which
// depends on whether the change is an upgrade (d.Upgrade).
func (d *Diff) describeRemoved() {
	for i := range d.RemovedSteps {
		r := &d.RemovedSteps[i]
		switch {
		case r.Phase == PhaseHost:
			r.Effect = "left on the host as it is: apply never undoes a host change (a file stays, a sysctl keeps its value, a package stays installed); nodespawn reset removes what it wrote"
		case r.Phase == PhaseStart:
			r.Effect = "no longer done when the machine starts"
		case d.Upgrade != nil && d.Upgrade.Refused == "":
			r.Effect = "not made in machine " + d.Upgrade.To + ", which is prepared without it; machine " + d.Upgrade.From + " keeps it until the next upgrade replaces it"
		default:
			r.Effect = "left in the machine's root as it is: apply never undoes a step (nodespawn reset, then apply, makes the machine without it)"
		}
	}
}

// SetUpgrade says the change is applied as u (nil: in place), and what
// that means for the removed steps.
func (d *Diff) SetUpgrade(u *UpgradeNote) {
	d.Upgrade = u
	d.describeRemoved()
}

// changedValues lists the parts of a step that differ, by JSON name,
// with their old and new values. a and b are redacted (Compare's); a
// secret file's contents and digest are Redacted here too.
func changedValues(a, b *Step) []FieldChange {
	var out []FieldChange
	if a.Phase != b.Phase || a.Kind != b.Kind {
		out = append(out, FieldChange{Field: "kind", Old: string(a.Phase) + "/" + string(a.Kind), New: string(b.Phase) + "/" + string(b.Kind)})
	}
	if a.Summary != b.Summary {
		out = append(out, FieldChange{Field: "summary", Old: a.Summary, New: b.Summary})
	}
	if !reflect.DeepEqual(a.After, b.After) {
		out = append(out, FieldChange{Field: "after", Old: a.After, New: b.After})
	}
	secret := (a.File != nil && a.File.Secret) || (b.File != nil && b.File.Secret)
	pa, pb := payload(a), payload(b)
	for _, k := range unionKeys(pa, pb) {
		if reflect.DeepEqual(pa[k], pb[k]) {
			continue
		}
		c := FieldChange{Field: string(a.Kind) + "." + k, Old: pa[k], New: pb[k]}
		switch {
		case secret && (k == "contents" || k == "digest"):
			c.Old, c.New = Redacted, Redacted
		case k == "contents" && a.File != nil && b.File != nil && (a.File.Encoding == "base64" || b.File.Encoding == "base64"):
			c.Base64 = true
		}
		out = append(out, c)
	}
	return out
}

// payload is a step's payload as a JSON object.
func payload(s *Step) map[string]any {
	b, err := json.Marshal(struct {
		*File      `json:"file,omitempty"`
		*Directory `json:"directory,omitempty"`
		*Link      `json:"link,omitempty"`
		*Packages  `json:"packages,omitempty"`
		*Modules   `json:"modules,omitempty"`
		*Sysctl    `json:"sysctl,omitempty"`
		*Swap      `json:"swap,omitempty"`
		*Image     `json:"image,omitempty"`
		*Download  `json:"download,omitempty"`
		*Systemd   `json:"systemd,omitempty"`
		*Wait      `json:"wait,omitempty"`
	}{s.File, s.Directory, s.Link, s.Packages, s.Modules, s.Sysctl, s.Swap, s.Image, s.Download, s.Systemd, s.Wait})
	if err != nil {
		panic(fmt.Sprintf("plan: marshal step %s: %v", s.ID, err))
	}
	var outer map[string]map[string]any
	if err := json.Unmarshal(b, &outer); err != nil {
		panic(fmt.Sprintf("plan: step %s: %v", s.ID, err))
	}
	for _, v := range outer {
		return v
	}
	return map[string]any{}
}

func unionKeys(a, b map[string]any) []string {
	var keys []string
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}

// unified is the unified diff of two texts, three lines of context.
func unified(a, b string) string {
	s, err := difflib.GetUnifiedDiffString(difflib.UnifiedDiff{
		A: difflib.SplitLines(a), B: difflib.SplitLines(b),
		FromFile: "applied", ToFile: "new", Context: 3,
	})
	if err != nil {
		return ""
	}
	return s
}

// WriteDiffText prints a diff for people: the steps added, removed and
// changed, with the unified diff of each changed text file.
func WriteDiffText(w io.Writer, d *Diff) error {
	tw := &errWriter{w: w}
	tw.printf("Changes against the applied plan (machine %s, node %s):\n", d.From.Machine, d.From.NodeName)
	if a := d.Apply; a != nil && (d.Upgrade == nil || a.Action == "refuse") {
		tw.printf("  %s\n", a.Summary)
	} else if u := d.Upgrade; u != nil && u.Refused != "" {
		tw.printf("  apply would refuse this manifest: %s\n", u.Refused)
	} else if u != nil {
		tw.printf("  applied as an upgrade: machine %s is prepared beside running %s (its rootfs, binaries, configuration),\n", u.To, u.From)
		tw.printf("  then %s is stopped (within %s), %s started, and the Node must be Ready within %s, else %s runs it again\n", u.From, u.StopTimeout, u.To, u.ReadyTimeout, u.From)
	}
	if d.Empty() {
		tw.printf("  none: the applied plan does this already\n")
		return tw.err
	}
	tw.printf("  %d added, %d removed, %d changed, %d unchanged\n", len(d.Added), len(d.Removed), len(d.Changed), d.Unchanged)
	for i, id := range d.Added {
		tw.printf("+ %s\n", id)
		if i < len(d.AddedSteps) {
			s := d.AddedSteps[i]
			tw.printf("  %s\n", s.Summary)
			writeDetail(tw, &s)
		}
	}
	for i, id := range d.Removed {
		tw.printf("- %s\n", id)
		if i < len(d.RemovedSteps) {
			r := d.RemovedSteps[i]
			tw.printf("  was: %s\n  now: %s\n", r.Summary, r.Effect)
		}
	}
	for _, c := range d.Changed {
		tw.printf("~ %s (%s)\n", c.ID, strings.Join(c.Fields, ", "))
		for _, v := range c.Values {
			switch {
			case v.Field == "file.contents" && c.Unified != "":
				// The unified diff below says it line by line.
			case v.Old == Redacted:
				tw.printf("    %s: %s (changed: the secret's digest differs)\n", v.Field, Redacted)
			case v.Base64:
				tw.printf("    %s: %s -> %s\n", v.Field, binaryText(v.Old), binaryText(v.New))
			case strings.HasSuffix(v.Field, ".mode"):
				tw.printf("    %s: %s -> %s\n", v.Field, modeText(v.Old), modeText(v.New))
			default:
				tw.printf("    %s: %s -> %s\n", v.Field, valueText(v.Old), valueText(v.New))
			}
		}
		if c.Unified != "" {
			for _, line := range strings.Split(strings.TrimSuffix(c.Unified, "\n"), "\n") {
				tw.printf("    %s\n", line)
			}
		}
	}
	return tw.err
}

// valueText is a field's value on one line: a string as Go quotes it (so
// an empty one or one with spaces is visible), anything else as JSON,
// "(none)" when absent.
func valueText(v any) string {
	switch v := v.(type) {
	case nil:
		return "(none)"
	case string:
		return strconv.Quote(v)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

// binaryText is a binary file's contents (base64) for people: its size.
func binaryText(v any) string {
	s, ok := v.(string)
	if !ok {
		return valueText(v)
	}
	return fmt.Sprintf("<%d bytes of data>", len(s)*3/4)
}

// modeText is a file mode as the plan's text shows it, in octal.
func modeText(v any) string {
	if f, ok := v.(float64); ok {
		return fmt.Sprintf("%04o", int64(f))
	}
	return valueText(v)
}

// WriteDiffJSON prints a diff as indented JSON ("version": DiffVersion).
func WriteDiffJSON(w io.Writer, d *Diff) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(d)
}
