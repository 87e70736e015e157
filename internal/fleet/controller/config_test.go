package controller_test

import (
	"context"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/fleet/controller"
	"github.com/nodespawn/nodespawn/internal/kubetest"
	"github.com/nodespawn/nodespawn/manifest"
)

// TestConfigWithABootstrapTokenIsRefusedWhenWritten: a NodeSpawnConfig is
// readable by every node, so a manifest carrying a bootstrap token never
// gets stored (the CRD's rule on spec.manifest), however the manifest is
// written; a manifest that only mentions the word elsewhere is stored; and
// a secret no rule can see in the text (an exec plugin's environment
// value) is stored but found by the controller's validation.
func TestConfigWithABootstrapTokenIsRefusedWhenWritten(t *testing.T) {
	c := kubetest.Get(t)
	ctx := context.Background()
	base, _ := kubetest.FleetConfig(t, "secret")
	digest := func(m string) string {
		t.Helper()
		// The digest of what is stored, so that only the rule refuses
		// (the token's own manifests are not read: any digest will do).
		lm, err := manifest.Load("m", []byte(m))
		if err != nil {
			return "sha256:" + strings.Repeat("0", 64)
		}
		d, err := lm.ConfigDigest()
		if err != nil {
			t.Fatal(err)
		}
		return d.String()
	}
	withAuth := func(auth string) string {
		return strings.Replace(base, "kubernetes:\n", "kubernetes:\n"+auth, 1)
	}
	create := func(name, m string) error {
		return c.Client.Create(ctx, &v1alpha1.NodeSpawnConfig{
			ObjectMeta: metav1.ObjectMeta{Name: kubetest.NameFor(t, name)},
			Spec:       v1alpha1.NodeSpawnConfigSpec{Manifest: m, Digest: digest(m)},
		})
	}
	for _, tc := range []struct{ name, manifest string }{
		{"block", withAuth("  auth:\n    bootstrapToken: abcdef.0123456789abcdef\n")},
		{"flow", withAuth("  auth: {bootstrapToken: abcdef.0123456789abcdef}\n")},
		{"quoted", withAuth("  auth:\n    \"bootstrapToken\" : 'abcdef.0123456789abcdef'\n")},
	} {
		err := create(tc.name, tc.manifest)
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "kubernetes.auth.bootstrapToken") {
			t.Errorf("%s: create = %v; want it refused as invalid, naming the token", tc.name, err)
		}
	}

	// The word in a file's contents (a kubeadm-style bootstrapTokens list
	// is another key) is no token.
	mentions := base + "\nmachine:\n  extra:\n    storage:\n      files:\n      - path: /etc/notes.yaml\n        contents: {inline: \"bootstrapTokens: []\"}\n"
	if strings.Contains(base, "\nmachine:") {
		t.Fatal("the example has a machine section; the test appends one")
	}
	if err := create("mentions", mentions); err != nil {
		t.Errorf("a manifest that mentions bootstrapTokens in a file: %v; want it stored", err)
	}

	// An exec plugin's environment value: stored, then Valid False.
	exec := withAuth("  auth:\n    exec:\n      command: /usr/local/bin/token\n      env: [{name: API_KEY, value: s3cr3t}]\n")
	if err := create("exec", exec); err != nil {
		t.Fatalf("a config with an exec plugin's env value: %v; want it stored (no rule sees it)", err)
	}
	cond := controller.Validate(&v1alpha1.NodeSpawnConfig{Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: exec, Digest: digest(exec)}})
	if cond.Status != metav1.ConditionFalse || cond.Reason != "HoldsSecret" || strings.Contains(cond.Message, "s3cr3t") {
		t.Errorf("Validate = %+v; want False, HoldsSecret, without the value", cond)
	}
}
