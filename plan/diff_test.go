package plan

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func filePlan(machine string, files map[string]string, secret string) *Plan {
	p := &Plan{Version: Version, Machine: machine, NodeName: "n1"}
	for _, path := range []string{"/etc/a", "/etc/b", "/etc/c", "/etc/d"} {
		c, ok := files[path]
		if !ok {
			continue
		}
		p.Steps = append(p.Steps, Step{ID: "machine:file:" + path, Phase: PhaseMachine, Kind: KindFile, Summary: "write " + path,
			File: &File{Path: path, Mode: 0o644, Contents: c, Overwrite: true}})
	}
	p.Steps = append(p.Steps, Step{ID: "machine:file:/kubeconfig", Phase: PhaseMachine, Kind: KindFile, Summary: "kubeconfig",
		File: &File{Path: "/kubeconfig", Mode: 0o600, Contents: "token: " + secret + "\n", Overwrite: true, Secret: true}})
	return p
}

// TestCompare diffs a stored plan (as apply keeps it) against a new one:
// a file added, one removed, one changed (with its unified diff), one
// unchanged, and a changed secret named without its contents.
func TestCompare(t *testing.T) {
	applied := filePlan("kube1", map[string]string{"/etc/a": "same\n", "/etc/b": "one\ntwo\nthree\n", "/etc/c": "gone\n"}, "OLD-SECRET-1234")
	stored := applied.RedactKeepingDigests()
	next := filePlan("kube2", map[string]string{"/etc/a": "same\n", "/etc/b": "one\nTWO\nthree\n", "/etc/d": "new\n"}, "NEW-SECRET-5678")

	d := Compare(stored, next)
	if strings.Join(d.Added, ",") != "machine:file:/etc/d" || strings.Join(d.Removed, ",") != "machine:file:/etc/c" || d.Unchanged != 1 {
		t.Errorf("added %v removed %v unchanged %d", d.Added, d.Removed, d.Unchanged)
	}
	if len(d.Changed) != 2 || d.Changed[0].ID != "machine:file:/etc/b" || d.Changed[1].ID != "machine:file:/kubeconfig" {
		t.Fatalf("changed %+v", d.Changed)
	}
	if !strings.Contains(d.Changed[0].Unified, "-two\n+TWO\n") || strings.Join(d.Changed[0].Fields, ",") != "file.contents" {
		t.Errorf("changed file: %+v", d.Changed[0])
	}
	if strings.Join(d.Changed[1].Fields, ",") != "file.digest" || d.Changed[1].Unified != "" {
		t.Errorf("changed secret: %+v", d.Changed[1])
	}
	if d.From.Machine != "kube1" || d.To.Machine != "kube2" || d.To.Digest != next.Digest() {
		t.Errorf("sides %+v %+v", d.From, d.To)
	}
	var text, js bytes.Buffer
	if err := WriteDiffText(&text, d); err != nil {
		t.Fatal(err)
	}
	if err := WriteDiffJSON(&js, d); err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{text.String(), js.String()} {
		for _, secret := range []string{"OLD-SECRET", "NEW-SECRET", stored.Steps[len(stored.Steps)-1].File.Digest} {
			if strings.Contains(out, secret) {
				t.Errorf("the diff shows %q:\n%s", secret, out)
			}
		}
	}
	for _, want := range []string{"+ machine:file:/etc/d", "- machine:file:/etc/c", "~ machine:file:/etc/b (file.contents)", "    -two", "    +TWO", "~ machine:file:/kubeconfig (file.digest)"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
	var back Diff
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || back.Version != DiffVersion {
		t.Errorf("JSON: %v %+v", err, back)
	}
	if same := Compare(stored, applied); !same.Empty() {
		t.Errorf("a plan against its own stored form: %+v", same)
	}
	// Printing a stored plan never shows the digests it keeps.
	var printed bytes.Buffer
	WriteJSON(&printed, stored)
	if strings.Contains(printed.String(), "sha256:") {
		t.Errorf("a printed plan shows a secret's digest:\n%s", printed.String())
	}
}

// TestCompareValues checks that the diff carries values, in text and
// JSON: old -> new for each changed scalar (a download's version and URL),
// the contents of an added file, what a removed step becomes (in place and
// in an upgrade), and a changed secret as <redacted> on both sides.
func TestCompareValues(t *testing.T) {
	dl := func(v string) Step {
		return Step{ID: "rootfs:download:kubelet", Phase: PhaseRootfs, Kind: KindDownload, Summary: "kubelet " + v,
			Download: &Download{URL: "https://dl.k8s.io/" + v + "/kubelet", ChecksumURL: "https://dl.k8s.io/" + v + "/kubelet.sha256", Dest: "/usr/bin/kubelet", Mode: 0o755}}
	}
	applied := filePlan("kube1", map[string]string{"/etc/a": "same\n"}, "OLD-SECRET-1234")
	applied.Steps = append(applied.Steps, dl("v1.37.1"),
		Step{ID: "host:sysctl:net", Phase: PhaseHost, Kind: KindSysctl, Summary: "forwarding", Sysctl: &Sysctl{Values: []KeyValue{{Key: "net.ipv4.ip_forward", Value: "1"}}}},
		Step{ID: "machine:file:/etc/old", Phase: PhaseMachine, Kind: KindFile, Summary: "old file", File: &File{Path: "/etc/old", Mode: 0o644, Contents: "x\n"}})
	next := filePlan("kube1", map[string]string{"/etc/a": "same\n", "/etc/d": "added line one\nadded line two\n"}, "NEW-SECRET-5678")
	next.Steps = append(next.Steps, dl("v1.37.2"))
	next.Steps[len(next.Steps)-2].File.Mode = 0o640 // the kubeconfig

	stored := applied.RedactKeepingDigests()
	d := Compare(stored, next)
	var text, js bytes.Buffer
	if err := WriteDiffText(&text, d); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`    download.url: "https://dl.k8s.io/v1.37.1/kubelet" -> "https://dl.k8s.io/v1.37.2/kubelet"`,
		`    summary: "kubelet v1.37.1" -> "kubelet v1.37.2"`,
		`    file.mode: 0600 -> 0640`,
		`    file.digest: <redacted> (changed: the secret's digest differs)`,
		"+ machine:file:/etc/d\n  write /etc/d\n  file /etc/d  mode 0644",
		"  | added line one\n  | added line two\n",
		"- host:sysctl:net\n  was: forwarding\n  now: left on the host as it is",
		"- machine:file:/etc/old\n  was: old file\n  now: left in the machine's root as it is",
	} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text lacks %q:\n%s", want, text.String())
		}
	}
	d.SetUpgrade(&UpgradeNote{From: "kube1", To: "kube2"})
	if err := WriteDiffJSON(&js, d); err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{text.String(), js.String()} {
		for _, secret := range []string{"OLD-SECRET", "NEW-SECRET", stored.Steps[1].File.Digest, next.RedactKeepingDigests().Steps[2].File.Digest} {
			if strings.Contains(out, secret) {
				t.Errorf("the diff shows %q:\n%s", secret, out)
			}
		}
	}
	var back struct {
		Changed []struct {
			ID     string
			Values []FieldChange
		}
		AddedSteps   []Step
		RemovedSteps []RemovedStep
	}
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range back.Changed {
		for _, v := range c.Values {
			got = append(got, fmt.Sprintf("%s %s: %v -> %v", c.ID, v.Field, v.Old, v.New))
		}
	}
	for _, want := range []string{
		"rootfs:download:kubelet download.checksumURL: https://dl.k8s.io/v1.37.1/kubelet.sha256 -> https://dl.k8s.io/v1.37.2/kubelet.sha256",
		"machine:file:/kubeconfig file.digest: <redacted> -> <redacted>",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("JSON values lack %q: %q", want, got)
		}
	}
	if len(back.AddedSteps) != 1 || back.AddedSteps[0].File.Contents != "added line one\nadded line two\n" {
		t.Errorf("JSON added steps: %+v", back.AddedSteps)
	}
	if len(back.RemovedSteps) != 2 || !strings.HasPrefix(back.RemovedSteps[1].Effect, "not made in machine kube2") {
		t.Errorf("JSON removed steps (an upgrade): %+v", back.RemovedSteps)
	}
}

// TestURLSecrets: a URL's password and query are hidden in a printed
// plan, kept as digests in a stored one (so that a new password is a
// change), and a printed stored plan shows neither them nor their digests.
func TestURLSecrets(t *testing.T) {
	withURL := func(password string) *Plan {
		p := filePlan("kube1", map[string]string{"/etc/a": "same\n"}, "TOKEN-1234")
		p.Warnings = []string{"fetching from https://u:" + password + "@mirror.example/x is slow"}
		p.Steps = append(p.Steps,
			Step{ID: "machine:file:/etc/remote", Phase: PhaseMachine, Kind: KindFile, Summary: "extra file /etc/remote",
				File: &File{Path: "/etc/remote", Mode: 0o644, Overwrite: true,
					Source: &Source{URL: "https://u:" + password + "@mirror.example/remote?sig=" + password, Hash: "sha256-00"}}},
			Step{ID: "rootfs:download:kubelet", Phase: PhaseRootfs, Kind: KindDownload, Summary: "download kubelet from http://" + password + "@mirror.example/kubelet",
				Download: &Download{Name: "kubelet", URL: "http://" + password + "@mirror.example/kubelet", ChecksumURL: "http://" + password + "@mirror.example/kubelet.sha256"}},
			Step{ID: "rootfs:image", Phase: PhaseRootfs, Kind: KindImage, Summary: "debootstrap",
				Image: &Image{Dest: "/var/lib/machines/kube1", Debootstrap: &DebootstrapSpec{Mirror: "http://u:" + password + "@archive.example/ubuntu"}}})
		return p
	}
	old, next := withURL("OLD-PASSWORD"), withURL("NEW-PASSWORD")
	stored := old.RedactKeepingDigests()
	storedJSON, _ := json.Marshal(stored)
	var printed bytes.Buffer
	for _, p := range []*Plan{old, stored} {
		if err := WriteText(&printed, p); err != nil {
			t.Fatal(err)
		}
		if err := WriteJSON(&printed, p); err != nil {
			t.Fatal(err)
		}
	}
	for _, secret := range []string{"OLD-PASSWORD", storedURLSecret} {
		if strings.Contains(printed.String(), secret) {
			t.Errorf("a printed plan shows %q:\n%s", secret, printed.String())
		}
	}
	if strings.Contains(string(storedJSON), "OLD-PASSWORD") || !strings.Contains(string(storedJSON), storedURLSecret) {
		t.Errorf("stored plan:\n%s", storedJSON)
	}
	for _, want := range []string{"https://u:<redacted>@mirror.example/remote?<redacted>", "http://<redacted>@mirror.example/kubelet", "http://u:<redacted>@archive.example/ubuntu", "warning: fetching from https://u:<redacted>@mirror.example/x"} {
		if !strings.Contains(printed.String(), want) {
			t.Errorf("printed plan lacks %q", want)
		}
	}
	if d := Compare(stored, old); !d.Empty() {
		t.Errorf("a plan against its own stored form: %+v", d)
	}
	d := Compare(stored, next)
	var fields []string
	for _, c := range d.Changed {
		fields = append(fields, c.ID+" "+strings.Join(c.Fields, ","))
	}
	if got := strings.Join(fields, "; "); got != "machine:file:/etc/remote file.source; rootfs:download:kubelet summary,download.checksumURL,download.url; rootfs:image image.debootstrap" {
		t.Errorf("a new password changes %q", got)
	}
}
