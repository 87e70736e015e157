package schema

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
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
		walk(path, s.Ref)
		if s.Properties != nil && s.AdditionalProperties != false {
			t.Errorf("%s: object without additionalProperties: false", path)
		}
		for name, p := range s.Properties {
			if describe(p) == "" {
				t.Errorf("%s.%s: no description", path, name)
			}
			walk(path+"."+name, p)
		}
		if ap, ok := s.AdditionalProperties.(*jsonschema.Schema); ok {
			walk(path+".*", ap)
		}
		walk(path+"[]", s.Items2020)
	}
	walk("$", s)
	if len(seen) < 20 {
		t.Fatalf("walked only %d schemas; the walk is broken", len(seen))
	}
}

func describe(s *jsonschema.Schema) string {
	for ; s != nil; s = s.Ref {
		if d := strings.TrimSpace(s.Description); d != "" {
			return d
		}
	}
	return ""
}
