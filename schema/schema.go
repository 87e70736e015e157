// Package schema holds the JSON Schema of the nodespawn manifest: the
// contract for its structure, served to editors (yaml-language-server,
// VS Code) by `nodespawn schema` and used by package manifest to validate.
package schema

import (
	_ "embed"
	"fmt"
	"sync"

	"github.com/kaptinlin/jsonschema"
)

// JSON is the manifest's JSON Schema (draft 2020-12).
//
//go:embed schema.json
var JSON []byte

// ID is the schema's $id, the URL editors may fetch it from.
const ID = "https://nodespawn.dev/schema/v1alpha1.json"

var compiled = sync.OnceValues(compile)

// Compile returns the compiled schema. It is compiled once; later calls
// return the same value.
//
// The library (github.com/kaptinlin/jsonschema) compiles nothing at
// package init, unlike santhosh-tekuri/jsonschema, which compiled every
// draft's meta-schema in every command, `nodespawn version` included.
// Compile does not check the schema against its meta-schema; the tests do.
// Validate with Validate: the schema's methods are not safe for
// concurrent use.
func Compile() (*jsonschema.Schema, error) {
	return compiled()
}

// validateMu serializes validation: the library caches on the shared
// compiled schema while it validates (a pattern's regexp, compiled on
// its first use), which is a data race between two validations.
// Warm starts compiling the schema in the background, so that it is ready
// (or nearer ready) when the first manifest is checked: a caller that has
// other work before that (reading the source, probing the host) overlaps
// the two. Compile and Validate wait for it; calling Warm again does
// nothing.
func Warm() { go compiled() }

var validateMu sync.Mutex

// Validate validates v (a document decoded into map[string]any, []any,
// string, bool, json.Number and nil) against the compiled schema. Safe
// for concurrent use, unlike the compiled schema's own methods.
func Validate(v any) (*jsonschema.EvaluationResult, error) {
	s, err := Compile()
	if err != nil {
		return nil, err
	}
	validateMu.Lock()
	defer validateMu.Unlock()
	return s.ValidateStruct(v), nil
}

func compile() (*jsonschema.Schema, error) {
	c := jsonschema.NewCompiler()
	// The schema refers only to itself: never fetch a reference.
	delete(c.Loaders, "http")
	delete(c.Loaders, "https")
	s, err := c.Compile(JSON, ID)
	if err != nil {
		return nil, fmt.Errorf("compile embedded schema: %w", err)
	}
	return s, nil
}
