package provision

import (
	"os/exec"
	"reflect"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/kubecheck"
	"github.com/nodespawn/nodespawn/manifest"
)

// TestEnvScriptPassesEnvironment runs envScript with /bin/sh as the machine
// would: every value arrives byte for byte, whatever shell syntax it holds.
func TestEnvScriptPassesEnvironment(t *testing.T) {
	env := []string{
		"TOKEN=s3cr3t $HOME `id` \"quoted\" \\back\\ 'single' ; rm -rf /",
		"KUBERNETES_EXEC_INFO={\"kind\":\"ExecCredential\"}",
		"EMPTY=",
	}
	assign, err := envAssignments(env)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", "-c", envScript, "sh", "/usr/bin/env")
	cmd.Stdin = strings.NewReader(assign)
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sh: %v", err)
	}
	got := map[string]bool{}
	for _, l := range strings.Split(string(out), "\n") {
		got[l] = true
	}
	for _, kv := range env {
		if !got[kv] {
			t.Errorf("the plugin's environment lacks %q:\n%s", kv, out)
		}
	}
	if strings.Contains(strings.Join(cmd.Args, " "), "s3cr3t") {
		t.Errorf("a value is on the command line: %q", cmd.Args)
	}
}

func TestEnvAssignmentsRefuses(t *testing.T) {
	for _, env := range [][]string{{"A=two\nlines"}, {"NOT-A-NAME=x"}, {"X;rm=y"}, {"=x"}, {"1A=x"}} {
		if _, err := envAssignments(env); err == nil {
			t.Errorf("envAssignments(%q) accepted it", env)
		}
	}
}

// TestExecPlugin: the manifest's exec plugin reaches kubecheck whole, its
// env in order.
func TestExecPlugin(t *testing.T) {
	got := execPlugin(&manifest.ExecProvider{APIVersion: "client.authentication.k8s.io/v1beta1", Command: "/bin/get-token", Args: []string{"--cluster", "a"},
		Env: []manifest.EnvVar{{Name: "B", Value: "x=y"}, {Name: "A", Value: ""}}})
	want := kubecheck.ExecPlugin{APIVersion: "client.authentication.k8s.io/v1beta1", Command: "/bin/get-token", Args: []string{"--cluster", "a"},
		Env: []string{"B=x=y", "A="}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("execPlugin = %+v, want %+v", got, want)
	}
}
