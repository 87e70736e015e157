package plan

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"sort"
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
	// Unchanged counts the steps that are the same in both.
	Unchanged int `json:"unchanged"`
	// Upgrade, when set, says the change is applied by preparing the other
	// machine of the pair and switching to it (the caller fills it in: it
	// depends on the host's state, not on the two plans).
	Upgrade *UpgradeNote `json:"upgrade,omitempty"`
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
	// Unified is the unified diff of a text file's contents.
	Unified string `json:"unified,omitempty"`
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
		Added: []string{}, Removed: []string{}, Changed: []Change{}}
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
			continue
		}
		fields := changedFields(o, s)
		if len(fields) == 0 {
			d.Unchanged++
			continue
		}
		c := Change{ID: s.ID, Fields: fields}
		if o.File != nil && s.File != nil && !s.File.Secret && o.File.Encoding == "" && s.File.Encoding == "" && o.File.Contents != s.File.Contents {
			c.Unified = unified(o.File.Contents, s.File.Contents)
		}
		d.Changed = append(d.Changed, c)
	}
	for _, s := range from.Steps {
		if !seen[s.ID] {
			d.Removed = append(d.Removed, s.ID)
		}
	}
	return d
}

// changedFields lists the parts of a step that differ, by JSON name.
func changedFields(a, b *Step) []string {
	var out []string
	if a.Phase != b.Phase || a.Kind != b.Kind {
		out = append(out, "kind")
	}
	if a.Summary != b.Summary {
		out = append(out, "summary")
	}
	if !reflect.DeepEqual(a.After, b.After) {
		out = append(out, "after")
	}
	pa, pb := payload(a), payload(b)
	for _, k := range unionKeys(pa, pb) {
		if !reflect.DeepEqual(pa[k], pb[k]) {
			out = append(out, string(a.Kind)+"."+k)
		}
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
	if u := d.Upgrade; u != nil && u.Refused != "" {
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
	for _, id := range d.Added {
		tw.printf("+ %s\n", id)
	}
	for _, id := range d.Removed {
		tw.printf("- %s\n", id)
	}
	for _, c := range d.Changed {
		tw.printf("~ %s (%s)\n", c.ID, strings.Join(c.Fields, ", "))
		if c.Unified != "" {
			for _, line := range strings.Split(strings.TrimSuffix(c.Unified, "\n"), "\n") {
				tw.printf("    %s\n", line)
			}
		}
	}
	return tw.err
}

// WriteDiffJSON prints a diff as indented JSON ("version": DiffVersion).
func WriteDiffJSON(w io.Writer, d *Diff) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(d)
}
