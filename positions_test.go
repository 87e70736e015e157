package main

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// positionsManifest is examples/minimal.yaml with kubernetes.version made
// a number (a schema error on its line 5 of the manifest).
func positionsManifest(t *testing.T) (string, int) {
	t.Helper()
	data, err := os.ReadFile("examples/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, "  version: ") {
			lines[i] = "  version: 1.37"
			return strings.Join(lines, "\n"), i + 1
		}
	}
	t.Fatal("examples/minimal.yaml has no kubernetes.version")
	return "", 0
}

func indentLines(s, pre string) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		if strings.TrimSpace(l) != "" {
			b.WriteString(pre)
		}
		b.WriteString(l)
	}
	return b.String()
}

// TestErrorsInEmbeddedManifestsNameTheUserDataLines: a manifest inside
// user-data is reported at lines of the user-data file the user gave (a
// #cloud-config literal block, a MIME part), with a snippet of that line;
// where no line holds it (gz+b64), the error names the file and the
// write_files entry and no line.
func TestErrorsInEmbeddedManifestsNameTheUserDataLines(t *testing.T) {
	m, line := positionsManifest(t)
	const head = "#cloud-config\npackage_update: false\nwrite_files:\n  - path: /etc/motd\n    content: hello\n  - path: /etc/nodespawn/manifest.yaml\n    content: |\n"
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte(m))
	zw.Close()
	mime := "Content-Type: multipart/mixed; boundary=\"XX\"\nMIME-Version: 1.0\n\n--XX\nContent-Type: text/cloud-config\n\n#cloud-config\nruncmd: []\n--XX\nContent-Type: application/vnd.nodespawn.manifest+yaml\n\n" + m + "\n--XX--\n"
	mimeLine := strings.Count(mime[:strings.Index(mime, m)], "\n") + line
	dir := t.TempDir()
	for _, c := range []struct {
		name, data string
		want       string // the error's position prefix
		snippet    string // its snippet's first line, "" for none
	}{
		{"cloud-config literal block", head + indentLines(m, "      "), "ud.yaml:" + itoa(7+line) + ":18: $.kubernetes.version:", itoa(7+line) + " |         version: 1.37"},
		{"multipart", mime, "ud.yaml:" + itoa(mimeLine) + ":12: $.kubernetes.version:", itoa(mimeLine) + " |   version: 1.37"},
		{"cloud-config gz+b64", "#cloud-config\nwrite_files:\n  - path: /etc/nodespawn/manifest.yaml\n    encoding: gz+b64\n    content: " + base64.StdEncoding.EncodeToString(gz.Bytes()) + "\n",
			"ud.yaml: write_files[0]: $.kubernetes.version:", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := filepath.Join(dir, "ud.yaml")
			if err := os.WriteFile(f, []byte(c.data), 0o600); err != nil {
				t.Fatal(err)
			}
			for _, cmd := range [][]string{{"validate", "-f", f}, {"apply", "--dry-run", "-f", f, "--facts", cpuFacts}} {
				code, _, out := cli(t, "", cmd...)
				out = strings.ReplaceAll(out, dir+"/", "")
				if code != exitBadInput || !strings.HasPrefix(out, c.want) || strings.Contains(out, "#") {
					t.Errorf("%s: exit %d, want %d and an error at %q:\n%s", cmd[0], code, exitBadInput, c.want, out)
				}
				lines := strings.Split(out, "\n")
				switch {
				case c.snippet == "" && len(lines) > 1 && strings.Contains(lines[1], "|"):
					t.Errorf("%s: a snippet of a line that does not hold the manifest:\n%s", cmd[0], out)
				case c.snippet != "" && (len(lines) < 3 || lines[1] != c.snippet || lines[2] != caretUnder(c.want)):
					t.Errorf("%s: snippet\n%s\nwant %q with the caret under the value", cmd[0], out, c.snippet)
				}
			}
		})
	}
}

// TestHostErrorsAtTheirField: an error only this host causes is placed at
// the field it names; when the manifest does not write that field, at the
// file alone: no line, no caret on an unrelated line.
func TestHostErrorsAtTheirField(t *testing.T) {
	var facts map[string]any
	data, err := os.ReadFile(cpuFacts)
	if err != nil {
		t.Fatal(err)
	}
	must(t, json.Unmarshal(data, &facts))
	// A host with only systemd-resolved's stub.
	facts["resolvConf"], facts["nameservers"] = "/etc/resolv.conf", []string{"127.0.0.53"}
	delete(facts, "upstream")
	stub := filepath.Join(t.TempDir(), "stub.json")
	data, _ = json.Marshal(facts)
	must(t, os.WriteFile(stub, data, 0o644))

	code, _, out := cli(t, "", "apply", "--dry-run", "-f", "examples/minimal.yaml", "--facts", stub)
	if code != exitBadInput || !strings.HasPrefix(out, "examples/minimal.yaml: $.machine.dns.nameservers: this host has no upstream name server") || strings.Contains(out, "^") {
		t.Errorf("stub resolver host: exit %d, want %d, the file and no line or caret:\n%s", code, exitBadInput, out)
	}
	// gpu: "on" is written: the error is at it.
	code, _, out = cli(t, "", "apply", "--dry-run", "-f", "examples/gpu.yaml", "--facts", cpuFacts)
	if re := regexp.MustCompile(`^examples/gpu.yaml:(\d+):\d+: \$\.machine\.gpu: `); code != exitBadInput || !re.MatchString(out) {
		t.Errorf("gpu on a CPU host: exit %d:\n%s", code, out)
	} else if n := re.FindStringSubmatch(out)[1]; !strings.Contains(strings.Split(readString(t, "examples/gpu.yaml"), "\n")[atoi(n)-1], "gpu:") {
		t.Errorf("line %s of examples/gpu.yaml is not the gpu field:\n%s", n, out)
	}
}

// caretUnder is the caret line of the snippet of the error at the
// FILE:LINE:COL: prefix.
func caretUnder(prefix string) string {
	f := strings.Split(prefix, ":")
	return strings.Repeat(" ", len(f[1])) + " | " + strings.Repeat(" ", atoi(f[2])-1) + "^"
}

func itoa(n int) string { return strconv.Itoa(n) }

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

func readString(t *testing.T, p string) string {
	b, err := os.ReadFile(p)
	must(t, err)
	return string(b)
}
