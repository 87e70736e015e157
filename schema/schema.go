// Package schema holds the JSON Schema of the nodespawn manifest: the
// contract for its structure, served to editors (yaml-language-server,
// VS Code) by `nodespawn schema` and used by package manifest to validate.
package schema

import (
	"bytes"
	_ "embed"
	"fmt"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v6"
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
func Compile() (*jsonschema.Schema, error) {
	return compiled()
}

func compile() (*jsonschema.Schema, error) {
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(JSON))
	if err != nil {
		return nil, fmt.Errorf("parse embedded schema: %w", err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource(ID, doc); err != nil {
		return nil, fmt.Errorf("add embedded schema: %w", err)
	}
	s, err := c.Compile(ID)
	if err != nil {
		return nil, fmt.Errorf("compile embedded schema: %w", err)
	}
	return s, nil
}
