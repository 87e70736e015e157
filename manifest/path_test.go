package manifest

import (
	"slices"
	"testing"

	jsonpath "github.com/coreos/vcontext/path"
	"github.com/kaptinlin/jsonschema"
)

func TestFormatPath(t *testing.T) {
	for _, tc := range []struct {
		path jsonpath.ContextPath
		want string
	}{
		{jsonpath.ContextPath{}, "$"},
		{jsonpath.New("", "kubernetes"), "$.kubernetes"},
		{jsonpath.New("", "kubernetes", "kubeletArgs", 0), "$.kubernetes.kubeletArgs[0]"},
		{jsonpath.New("", "kubernetes", "taints", 2, "key"), "$.kubernetes.taints[2].key"},
		{jsonpath.New("", "a", 0, 1), "$.a[0][1]"},
		{jsonpath.New("", "kubernetes", "labels", "example.com/x"), `$.kubernetes.labels["example.com/x"]`},
		{jsonpath.New("", "kubernetes", "labels", `a.b/c["]`), `$.kubernetes.labels["a.b/c[\"]"]`},
		{jsonpath.New("", "host", "sysctls", "x.y", "z"), `$.host.sysctls["x.y"].z`},
		{jsonpath.New("", "a", "b-c"), `$.a["b-c"]`},
		{jsonpath.New("", "_x1", "1x"), `$._x1["1x"]`},
		{jsonpath.New("", "ключ", "café"), `$["ключ"]["café"]`},
		{jsonpath.New("", "a\nb", "zero\u200bwidth"), `$["a\nb"]["zero\u200bwidth"]`},
		{jsonpath.New("", ""), `$[""]`},
		// A member named "0" is not the array element 0.
		{jsonpath.New("", "0", 0), `$["0"][0]`},
		{jsonpath.New("facts", "arch"), "facts.arch"},
	} {
		if got := FormatPath(tc.path); got != tc.want {
			t.Errorf("FormatPath(%#v) = %s, want %s", tc.path.Path, got, tc.want)
		}
	}
}

// TestPathsAreCopied: a problem keeps the path it was given, though the
// caller goes on appending to the array under it.
func TestPathsAreCopied(t *testing.T) {
	base := jsonpath.ContextPath{Path: make([]any, 0, 8)}.Append("a")
	var c checker
	d := newDocument("m.yaml", nil)
	for i := range 3 {
		c.add(base.Append(i), "x")
		d.add(problem{path: base.Append("k", i), msg: "x"})
	}
	for i, want := range []string{"$.a[0]", "$.a[1]", "$.a[2]"} {
		if got := FormatPath(c.probs[i].path); got != want {
			t.Errorf("checker problem %d at %s, want %s", i, got, want)
		}
	}
	for i, want := range []string{"$.a.k[0]", "$.a.k[1]", "$.a.k[2]"} {
		if got := FormatPath(d.probs[i].path); got != want {
			t.Errorf("document problem %d at %s, want %s", i, got, want)
		}
	}
}

func TestWithin(t *testing.T) {
	a := jsonpath.New("", "a")
	for _, tc := range []struct {
		p, outer jsonpath.ContextPath
		want     bool
	}{
		{a, a, true},
		{jsonpath.New("", "a", "b", 0), a, true},
		{a, jsonpath.ContextPath{}, true},
		{a, jsonpath.New("", "a", "b"), false},
		{jsonpath.New("", "ab"), a, false},
		{jsonpath.New("", "a.b"), a, false},
		{jsonpath.New("", "a", 0), jsonpath.New("", "a", "0"), false},
		{jsonpath.New("facts", "a"), a, false},
	} {
		if got := within(tc.p, tc.outer); got != tc.want {
			t.Errorf("within(%s, %s) = %t", FormatPath(tc.p), FormatPath(tc.outer), got)
		}
	}
}

func TestLastKey(t *testing.T) {
	for _, tc := range []struct {
		path jsonpath.ContextPath
		want string
	}{
		{jsonpath.ContextPath{}, ""},
		{jsonpath.New("", "machine", "gpu"), "gpu"},
		{jsonpath.New("", "a", "x.y"), "x.y"},
		{jsonpath.New("", "a", 3), ""},
	} {
		if got := lastKey(tc.path); got != tc.want {
			t.Errorf("lastKey(%s) = %q, want %q", FormatPath(tc.path), got, tc.want)
		}
	}
}

func TestIsSecretPath(t *testing.T) {
	file := jsonpath.New("", "host", "extra", "storage", "files", 0, "contents")
	for _, tc := range []struct {
		path jsonpath.ContextPath
		want bool
	}{
		{jsonpath.New("", "kubernetes", "auth", "bootstrapToken"), true},
		{jsonpath.New("", "kubernetes", "auth"), false},
		{jsonpath.New("", "kubernetes", "auth", "exec", "env", 3, "value"), true},
		{jsonpath.New("", "kubernetes", "auth", "exec", "env", 3, "name"), false},
		{jsonpath.New("", "kubernetes", "auth", "exec", "env", "3", "value"), false},
		{file.Append("httpHeaders", 1, "value"), true},
		{file.Append("httpHeaders", 1, "name"), false},
		{file.Append("httpHeaders", "1", "value"), false},
		{jsonpath.New("", "httpHeaders", 0, "value"), true},
		{jsonpath.New("", "kubernetes", "auth", "bootstrapToken", "x"), false},
	} {
		if got := isSecretPath(tc.path); got != tc.want {
			t.Errorf("isSecretPath(%s) = %t", FormatPath(tc.path), got)
		}
	}
}

// TestInstancePath: the schema library gives each location as one
// unescaped token relative to its parent's; the document tells an array
// index from a member named like one, and a name may hold a slash.
func TestInstancePath(t *testing.T) {
	root := map[string]any{"a": []any{map[string]any{"0": []any{true}, "x/y": "v"}}}
	leaf := func(loc string) *jsonschema.EvaluationResult {
		return &jsonschema.EvaluationResult{InstanceLocation: loc, Errors: map[string]*jsonschema.EvaluationError{
			"type": jsonschema.NewEvaluationError("type", "type_mismatch", "wrong"),
		}}
	}
	nest := func(loc string, kids ...*jsonschema.EvaluationResult) *jsonschema.EvaluationResult {
		return &jsonschema.EvaluationResult{InstanceLocation: loc, Details: kids}
	}
	r := nest("", nest("/a", nest("/0", nest("", nest("/0", leaf("/0"))), leaf("/x/y"))))
	var got []string
	for _, f := range schemaFaults(r, root) {
		got = append(got, FormatPath(f.path))
	}
	if want := []string{`$.a[0]["0"][0]`, `$.a[0]["x/y"]`}; !slices.Equal(got, want) {
		t.Errorf("paths = %q, want %q", got, want)
	}
}
