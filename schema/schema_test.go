package schema

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/kaptinlin/jsonschema"
)

func TestCompile(t *testing.T) {
	s, err := Compile()
	if err != nil {
		t.Fatal(err)
	}
	again, err := Compile()
	if err != nil || again != s {
		t.Fatalf("Compile is not cached: %p %p %v", s, again, err)
	}
	var doc map[string]any
	if err := json.Unmarshal(JSON, &doc); err != nil {
		t.Fatal(err)
	}
	if doc["$id"] != ID {
		t.Errorf("$id = %v, want %s", doc["$id"], ID)
	}
}

// TestMetaSchema: the schema's keywords are well formed (Compile does
// not check). The library builds in the meta-schemas up to draft-07, not
// 2020-12's, and nothing may be fetched; so the check is against
// draft-07's, with $defs renamed to draft-07's definitions so that they
// are checked too. The schema uses no keyword 2020-12 added.
func TestMetaSchema(t *testing.T) {
	var doc any
	if err := json.Unmarshal(JSON, &doc); err != nil {
		t.Fatal(err)
	}
	var draft7 func(v any) any
	draft7 = func(v any) any {
		switch x := v.(type) {
		case map[string]any:
			out := map[string]any{}
			for k, c := range x {
				switch k {
				case "$defs":
					k = "definitions"
				case "$ref":
					if s, ok := c.(string); ok {
						c = strings.Replace(s, "#/$defs/", "#/definitions/", 1)
					}
				}
				out[k] = draft7(c)
			}
			return out
		case []any:
			for i := range x {
				x[i] = draft7(x[i])
			}
		}
		return v
	}
	check := func(doc any) (bool, error) {
		m := draft7(doc).(map[string]any)
		m["$schema"] = "http://json-schema.org/draft-07/schema#"
		b, err := json.Marshal(m)
		if err != nil {
			return false, err
		}
		c := jsonschema.NewCompiler()
		delete(c.Loaders, "http")
		delete(c.Loaders, "https")
		r, err := c.ValidateSchema(b)
		if err != nil {
			return false, err
		}
		if !r.IsValid() {
			t.Logf("meta-schema: %v", r.ToList())
		}
		return r.IsValid(), nil
	}
	if ok, err := check(doc); err != nil || !ok {
		t.Errorf("schema.json does not pass the meta-schema (err %v)", err)
	}
	// The check can fail: a bad keyword deep in $defs is found.
	var bad map[string]any
	if err := json.Unmarshal(JSON, &bad); err != nil {
		t.Fatal(err)
	}
	defs := bad["$defs"].(map[string]any)
	for name := range defs {
		defs[name] = map[string]any{"type": 3}
		break
	}
	if ok, err := check(bad); err != nil || ok {
		t.Errorf("a $defs entry with type 3 passed the meta-schema check (err %v)", err)
	}
}

// TestDescriptionsAndClosedObjects checks what editors and users rely on:
// every property is described, and every object refuses unknown keys.
func TestDescriptionsAndClosedObjects(t *testing.T) {
	s, err := Compile()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[*jsonschema.Schema]bool{}
	var walk func(path string, s *jsonschema.Schema)
	walk = func(path string, s *jsonschema.Schema) {
		if s == nil || seen[s] {
			return
		}
		seen[s] = true
		walk(path, s.ResolvedRef)
		ap := s.AdditionalProperties
		if s.Properties != nil && (ap == nil || ap.Boolean == nil || *ap.Boolean) {
			t.Errorf("%s: object without additionalProperties: false", path)
		}
		if s.Properties != nil {
			for name, p := range *s.Properties {
				if describe(p) == "" {
					t.Errorf("%s.%s: no description", path, name)
				}
				walk(path+"."+name, p)
			}
		}
		if ap != nil && ap.Boolean == nil {
			walk(path+".*", ap)
		}
		walk(path+"[]", s.Items)
	}
	walk("$", s)
	if len(seen) < 20 {
		t.Fatalf("walked only %d schemas; the walk is broken", len(seen))
	}
}

func describe(s *jsonschema.Schema) string {
	for ; s != nil; s = s.ResolvedRef {
		if s.Description != nil {
			if d := strings.TrimSpace(*s.Description); d != "" {
				return d
			}
		}
	}
	return ""
}
