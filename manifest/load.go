package manifest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	jsonpath "github.com/coreos/vcontext/path"
	"github.com/kaptinlin/jsonschema"

	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/internal/redact"
	"github.com/nodespawn/nodespawn/schema"
)

// Load decodes a manifest from data (YAML or JSON), validates it against the
// JSON Schema and the semantic rules, and returns it with defaults applied.
// filename names the source in error messages. When the manifest is bad the
// error is an Errors listing every problem found, each with its position.
func Load(filename string, data []byte) (*Manifest, error) {
	return load(newDocument(filename, data), data)
}

// Origin is where an embedded manifest lies in the file the user gave
// (user-data): errors name that file, and lines of it where the manifest's
// text is there as it is.
type Origin struct {
	// File is the file; Where is where inside it ("write_files[0]").
	File, Where string
	// Mapped says line L, column C of the manifest is File's line
	// L+LineOffset, column C+Indent; without it, errors name File and
	// Where, and no line.
	Mapped             bool
	LineOffset, Indent int
}

// LoadEmbedded is Load for a manifest found inside the file o names: every
// position it reports, now or later (ErrorAt), is one of that file.
func LoadEmbedded(o Origin, data []byte) (*Manifest, error) {
	d := newDocument(o.File, data)
	d.origin = &o
	return load(d, data)
}

func load(d *document, data []byte) (*Manifest, error) {
	filename := d.file
	sch, err := schema.Compile()
	if err != nil {
		return nil, err
	}
	if !d.parse(data) {
		return nil, d.errors()
	}
	if d.config {
		withAuth(d.root)
	}
	if len(d.probs) > 0 {
		// Duplicate or non-string keys: the value is not what the author
		// meant, so stop before guessing at more.
		return nil, d.errors()
	}

	// flagged holds the paths the schema complained about (and the
	// missing required members), so semantic checks stay quiet there.
	var flagged, shapes []jsonpath.ContextPath
	res, err := schema.Validate(d.root)
	if err != nil {
		return nil, err
	}
	if faults := schemaFaults(res, d.root); len(faults) > 0 {
		var prune []jsonpath.ContextPath
		flagged, prune, shapes = d.schemaProblems(sch, faults)
		// Drop the values the schema refused so the rest still decodes and
		// its semantic problems are reported in the same run.
		for _, p := range prune {
			d.root = without(d.root, p.Path)
		}
	}

	m, derr := decode(d.root)
	if derr != nil {
		if len(flagged) == 0 {
			// The schema accepted what the Go types cannot hold: the two
			// disagree, which is a bug here, not in the manifest.
			return nil, fmt.Errorf("decode %s: schema and types disagree: %w", filename, derr)
		}
		return nil, d.errors()
	}
	for _, p := range checkWith(m, checker{config: d.config}) {
		if !isFlagged(p.path, flagged) {
			d.probs = append(d.probs, p)
		}
	}
	d.shapeProblems(shapes)
	if len(d.probs) > 0 {
		return nil, d.errors()
	}
	ApplyDefaults(m)
	// Keep what places a path in the source, not the parsed tree.
	d.root, d.probs = nil, nil
	m.src = d
	return m, nil
}

// isFlagged reports whether a semantic problem at path would repeat or
// guess around a schema problem: one at path, inside it, or around it (a
// check on a whole object, like auth's "exactly one of", is unreliable
// when a member was refused).
func isFlagged(path jsonpath.ContextPath, flagged []jsonpath.ContextPath) bool {
	for _, f := range flagged {
		if within(path, f) || within(f, path) {
			return true
		}
	}
	return false
}

// decode turns the generic value into the Go types, refusing keys the types
// do not know (the schema already did; this guards the agreement).
func decode(root any) (*Manifest, error) {
	b, err := json.Marshal(root)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Manifest
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	return &m, nil
}

// --- schema errors

// fault is one complaint of the schema: the keywords that failed for the
// value at path (each of them on that value itself, not on a member).
type fault struct {
	path     jsonpath.ContextPath
	keywords []string
	errs     map[string]*jsonschema.EvaluationError
}

// applicators are keywords that fail because a subschema failed; that
// failure is reported where it happened, with its own keyword.
var applicators = map[string]bool{
	"$ref": true, "$dynamicRef": true, "properties": true, "patternProperties": true,
	"items": true, "prefixItems": true, "contains": true, "allOf": true, "anyOf": true,
	"oneOf": true, "not": true, "if": true, "then": true, "else": true,
	"dependentSchemas": true, "propertyNames": true, "unevaluatedProperties": true,
	"unevaluatedItems": true,
}

// schemaFaults flattens the validation result into the failed keywords of
// each value, in the order the result holds them. The library gives each
// nested result's location relative to its parent ("/name" or "/0", the
// name unescaped), so the path is built while walking, with the document
// telling array indexes from member names.
func schemaFaults(r *jsonschema.EvaluationResult, root any) []fault {
	var out []fault
	at := map[string]int{}
	var walk func(r *jsonschema.EvaluationResult, path jsonpath.ContextPath, v any)
	walk = func(r *jsonschema.EvaluationResult, path jsonpath.ContextPath, v any) {
		if r == nil || r.Valid {
			return
		}
		if e := r.Errors["schema"]; e != nil && e.Code == "false_schema_mismatch" &&
			strings.HasPrefix(r.EvaluationPath, "/additionalProperties/") {
			return // the member is unknown: its object's additionalProperties says so
		}
		for kw, e := range r.Errors {
			if applicators[kw] {
				continue
			}
			k := FormatPath(path)
			i, ok := at[k]
			if !ok {
				i = len(out)
				at[k] = i
				out = append(out, fault{path: path.Copy(), errs: map[string]*jsonschema.EvaluationError{}})
			}
			if _, dup := out[i].errs[kw]; !dup {
				out[i].keywords = append(out[i].keywords, kw)
				out[i].errs[kw] = e
			}
		}
		for _, c := range r.Details {
			tok, ok := strings.CutPrefix(c.InstanceLocation, "/")
			if !ok {
				walk(c, path, v)
				continue
			}
			switch x := v.(type) {
			case []any:
				i, _ := strconv.Atoi(tok)
				var child any
				if i >= 0 && i < len(x) {
					child = x[i]
				}
				walk(c, path.Append(i), child)
			case map[string]any:
				// The library also evaluates a required member that is
				// absent, as null; its object's "required" says it is missing.
				if child, ok := x[tok]; ok {
					walk(c, path.Append(tok), child)
				}
			default:
				walk(c, path.Append(tok), nil)
			}
		}
	}
	walk(r, jsonpath.New(""), root)
	for i := range out {
		// The library keeps them in a map: sort them in the order the
		// messages came before (the same line and column keep it).
		sort.Slice(out[i].keywords, func(a, b int) bool {
			ka, kb := out[i].keywords[a], out[i].keywords[b]
			if ra, rb := keywordRank(ka), keywordRank(kb); ra != rb {
				return ra < rb
			}
			return ka < kb
		})
	}
	return out
}

// keywordRank orders a value's failed keywords: a missing member before
// an unknown one.
func keywordRank(kw string) int {
	switch kw {
	case "required":
		return 0
	case "additionalProperties":
		return 2
	}
	return 1
}

// schemaProblems turns the schema's complaints into short messages. It
// returns the paths it flagged and those of the values the schema
// refused, and apart from them the values whose shape (a pattern) the
// schema refused: the semantic checks test the same shape and say what is
// wrong in the field's own words (shapeProblems).
//
// Like the validator nodespawn used before, a value of the wrong type, or
// one that is not the constant or one of the enum's values, gets that one
// complaint and no other.
func (d *document) schemaProblems(sch *jsonschema.Schema, faults []fault) (flagged, prune, shapes []jsonpath.ContextPath) {
	for _, f := range faults {
		path := f.path
		s := schemaAt(sch, path)
		v := valueAt(d.root, path.Path)
		kws := f.keywords
		for _, first := range []string{"type", "const", "enum"} {
			if f.errs[first] != nil {
				kws = []string{first}
				break
			}
		}
		for _, kw := range kws {
			switch kw {
			case "additionalProperties":
				if s == nil || s.AdditionalProperties == nil || s.AdditionalProperties.Boolean == nil {
					continue // a member failed the schema for additional members
				}
				allowed := propertyNames(s)
				for _, name := range unknownMembers(s, v) {
					p := path.Append(name).Copy()
					d.add(problem{path: p, key: true, msg: unknownField(name, allowed)})
					flagged = append(flagged, p)
					prune = append(prune, p)
				}
				continue
			case "required":
				if s == nil {
					break
				}
				obj, _ := v.(map[string]any)
				for _, name := range s.Required {
					if _, ok := obj[name]; !ok {
						d.add(problem{path: path, key: true, msg: fmt.Sprintf("missing required field %q", name)})
						flagged = append(flagged, path.Append(name).Copy())
					}
				}
				continue
			case "pattern":
				shapes = append(shapes, path)
				continue
			}
			d.add(problem{path: path, msg: d.schemaMessage(path, s, v, kw, f.errs[kw])})
			flagged = append(flagged, path)
			prune = append(prune, path)
		}
	}
	return flagged, prune, shapes
}

// valueAt is the value at the path elements elems of v (nil when absent).
func valueAt(v any, elems []any) any {
	for _, e := range elems {
		switch x := v.(type) {
		case map[string]any:
			key, _ := e.(string)
			v = x[key]
		case []any:
			i, ok := e.(int)
			if !ok || i < 0 || i >= len(x) {
				return nil
			}
			v = x[i]
		default:
			return nil
		}
	}
	return v
}

// unknownMembers are the members of the object v that s does not name,
// sorted.
func unknownMembers(s *jsonschema.Schema, v any) []string {
	obj, _ := v.(map[string]any)
	var names []string
	for name := range obj {
		if s.Properties != nil {
			if _, ok := (*s.Properties)[name]; ok {
				continue
			}
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// shapeProblems reports the values at paths whose pattern the schema
// refused and no other check did. The semantic checks test every shape the
// schema has a pattern for (TestSchemaPatternsAgree), so this is a guard:
// it never quotes a secret, nor the pattern's raw text at a secret path.
func (d *document) shapeProblems(paths []jsonpath.ContextPath) {
	for _, p := range paths {
		said := false
		for _, q := range d.probs {
			said = said || within(q.path, p) || within(p, q.path)
		}
		if said {
			continue
		}
		msg := "does not have the shape the schema asks for"
		if !isSecretPath(p) {
			msg = fmt.Sprintf("%q %s", d.raw[FormatPath(p)], msg)
		}
		d.add(problem{path: p, msg: msg})
	}
}

// without returns v with the value at the path elements elems removed (an
// array element becomes null, which decodes to the zero value).
func without(v any, elems []any) any {
	if len(elems) == 0 {
		return nil
	}
	switch x := v.(type) {
	case map[string]any:
		key, ok := elems[0].(string)
		switch {
		case !ok:
		case len(elems) == 1:
			delete(x, key)
		default:
			if c, ok := x[key]; ok {
				x[key] = without(c, elems[1:])
			}
		}
	case []any:
		if i, ok := elems[0].(int); ok && i >= 0 && i < len(x) {
			x[i] = without(x[i], elems[1:])
		}
	}
	return v
}

// jsonTypes are the JSON types in the order messages list them.
var jsonTypes = []string{"null", "boolean", "number", "integer", "string", "array", "object"}

// jsonType is the JSON type of a value of the parsed document; a number
// is a "number", whether or not it is whole.
func jsonType(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return "number"
}

// schemaMessage words the schema's complaint about the value v at path:
// keyword kw of s (nil when unknown) failed, as e says.
func (d *document) schemaMessage(path jsonpath.ContextPath, s *jsonschema.Schema, v any, kw string, e *jsonschema.EvaluationError) string {
	raw := d.raw[FormatPath(path)]
	switch {
	case s == nil:
	case kw == "type":
		var want []string
		for _, t := range jsonTypes {
			if contains(s.Type, t) {
				want = append(want, t)
			}
		}
		got := jsonType(v)
		msg := fmt.Sprintf("must be %s, not %s", typeNames(want), article(got))
		switch {
		case got == "null" && path.Len() > 0:
			msg += " (the key has no value)"
		case !contains(want, "string") || got == "object" || got == "array" || isSecretPath(path):
		case s.Enum != nil || s.Const != nil:
			// Quoting what was written does not help when the quoted
			// text is not one of the allowed strings either.
			return choiceMessage(path, s, got, raw)
		default:
			msg += fmt.Sprintf(" (quote it: %q)", raw)
		}
		return msg
	case kw == "enum" && s.Enum != nil:
		want := make([]string, len(s.Enum))
		for i, w := range s.Enum {
			want[i] = fmt.Sprint(w)
		}
		msg := "must be one of " + strings.Join(want, ", ")
		if got, ok := v.(string); ok && !isSecretPath(path) {
			if best, ok := closest(got, want); ok {
				msg += fmt.Sprintf(" (did you mean %q?)", best)
			}
		}
		return msg
	case kw == "const" && s.Const != nil:
		if got, ok := v.(string); ok && !isSecretPath(path) {
			return fmt.Sprintf("must be %q, not %q", fmt.Sprint(s.Const.Value), got)
		}
		return fmt.Sprintf("must be %q", fmt.Sprint(s.Const.Value))
	case kw == "minLength" && s.MinLength != nil:
		if *s.MinLength == 1 {
			return "must not be empty"
		}
		return fmt.Sprintf("must be at least %d characters long", int(*s.MinLength))
	case kw == "minimum" && s.Minimum != nil:
		return fmt.Sprintf("must be at least %s", s.Minimum.RatString())
	case kw == "maximum" && s.Maximum != nil:
		return fmt.Sprintf("must be at most %s", s.Maximum.RatString())
	case kw == "minItems" && s.MinItems != nil:
		arr, _ := v.([]any)
		return fmt.Sprintf("minItems: got %d, want %d", len(arr), int(*s.MinItems))
	}
	return e.Error()
}

// choiceMessage is the message for a boolean or number where one of a few
// strings (an enum or a const) is wanted. YAML 1.1 tools (PyYAML,
// sigs.k8s.io/yaml, Helm, kustomize) turn on, off, yes and no into booleans
// before nodespawn sees them, so gpu: on arrives as gpu: true; the hint
// names the quoted string that survives them.
func choiceMessage(path jsonpath.ContextPath, s *jsonschema.Schema, got, raw string) string {
	var allowed []string
	if s.Enum != nil {
		for _, v := range s.Enum {
			allowed = append(allowed, fmt.Sprint(v))
		}
	} else {
		allowed = []string{fmt.Sprint(s.Const.Value)}
	}
	quoted := make([]string, len(allowed))
	for i, a := range allowed {
		quoted[i] = strconv.Quote(a)
	}
	msg := "must be " + orList(quoted) + ", not " + article(got)
	if contains(allowed, raw) {
		return msg + fmt.Sprintf(" (quote it: %q)", raw)
	}
	if got != "boolean" || !contains(allowed, "on") || !contains(allowed, "off") {
		return msg
	}
	want := "off"
	if strings.EqualFold(raw, "true") {
		want = "on"
	}
	write := strconv.Quote(want)
	if key := lastKey(path); key != "" {
		write = key + ": " + write
	}
	return msg + "; write " + write + " (quoted), since YAML 1.1 tools turn on/off into true/false"
}

// orList joins words as "a", "a or b", "a, b or c".
func orList(words []string) string {
	if len(words) <= 1 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}

// lastKey is the member name that ends path, or "" when path is the root
// or ends in an array index.
func lastKey(path jsonpath.ContextPath) string {
	if n := path.Len(); n > 0 {
		key, _ := path.Path[n-1].(string)
		return key
	}
	return ""
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func article(t string) string {
	switch t {
	case "null":
		return "null"
	case "integer", "object", "array":
		return "an " + t
	}
	return "a " + t
}

func typeNames(want []string) string {
	names := make([]string, len(want))
	for i, w := range want {
		names[i] = article(w)
	}
	return strings.Join(names, " or ")
}

// schemaAt follows path through the schema: an index into the array's
// items, a member name into the object's properties.
func schemaAt(s *jsonschema.Schema, path jsonpath.ContextPath) *jsonschema.Schema {
	for _, e := range path.Path {
		s = deref(s)
		if s == nil {
			return nil
		}
		if _, ok := e.(int); ok {
			s = s.Items
			continue
		}
		key, _ := e.(string)
		if p, ok := properties(s)[key]; ok {
			s = p
		} else if ap := s.AdditionalProperties; ap != nil && ap.Boolean == nil {
			s = ap
		} else {
			return nil
		}
	}
	return deref(s)
}

func deref(s *jsonschema.Schema) *jsonschema.Schema {
	for s != nil && s.ResolvedRef != nil && s.Properties == nil {
		s = s.ResolvedRef
	}
	return s
}

func properties(s *jsonschema.Schema) jsonschema.SchemaMap {
	if s == nil || s.Properties == nil {
		return nil
	}
	return *s.Properties
}

func propertyNames(s *jsonschema.Schema) []string {
	props := properties(s)
	names := make([]string, 0, len(props))
	for n := range props {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// unknownField says a key is unknown and, when one is close, which was meant.
func unknownField(name string, allowed []string) string {
	msg := fmt.Sprintf("unknown field %q", name)
	best, ok := closest(name, allowed)
	switch {
	case ok:
		return msg + fmt.Sprintf(" (did you mean %q?)", best)
	case len(allowed) > 0 && len(allowed) <= 8:
		return msg + " (known fields: " + strings.Join(allowed, ", ") + ")"
	}
	return msg
}

// closest is the word of allowed nearest to name, ignoring case, when it is
// near enough to be what was meant (a typo, not another word).
func closest(name string, allowed []string) (string, bool) {
	best, bestDist := "", 0
	for _, a := range allowed {
		dist := editDistance(strings.ToLower(name), strings.ToLower(a))
		if best == "" || dist < bestDist {
			best, bestDist = a, dist
		}
	}
	return best, best != "" && bestDist < len(best) && (bestDist <= 2 || bestDist*3 <= len(best))
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	prev := make([]int, len(rb)+1)
	cur := make([]int, len(rb)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(ra); i++ {
		cur[0] = i
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(rb)]
}

// --- placing problems in the source

// errors places every problem, sorts them by position and drops repeats.
func (d *document) errors() Errors {
	var out Errors
	seen := map[string]bool{}
	for _, p := range d.probs {
		e := d.place(p)
		id := e.Error()
		if seen[id] {
			continue
		}
		seen[id] = true
		out = append(out, e)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Line != out[j].Line {
			return out[i].Line < out[j].Line
		}
		return out[i].Col < out[j].Col
	})
	return out
}

func (d *document) place(p problem) *Error {
	e := &Error{File: d.file, Message: p.msg}
	at := p.at
	if !p.text {
		e.Path = FormatPath(p.path)
		if at.line == 0 && (!p.exact || d.written(p.path)) {
			at = d.position(p.path, p.key)
		}
	}
	e.Line, e.Col = at.line, at.col
	if at.line > 0 && at.col > 0 {
		e.Snippet = d.snippet(at)
	}
	if o := d.origin; o != nil {
		switch {
		case !o.Mapped:
			// No line of the file holds the manifest (encoded): name
			// where in the file it is, and no line that is not there.
			e.Line, e.Col, e.Snippet, e.In = 0, 0, "", o.Where
		case e.Line > 0:
			e.Line += o.LineOffset
			if e.Col > 0 {
				e.Col += o.Indent
			}
		}
	}
	return e
}

// written reports whether the source spells out the value at path.
func (d *document) written(path jsonpath.ContextPath) bool {
	k := FormatPath(path)
	_, v := d.vals[k]
	_, key := d.keys[k]
	return v || key
}

// position finds where path is written: its key or its value, else the
// nearest enclosing value that is written.
func (d *document) position(path jsonpath.ContextPath, key bool) pos {
	k := FormatPath(path)
	if key || d.atKey[k] {
		if at, ok := d.keys[k]; ok {
			return at
		}
	}
	for {
		if at, ok := d.vals[k]; ok {
			return at
		}
		if at, ok := d.keys[k]; ok {
			return at
		}
		if path.Len() == 0 {
			return pos{}
		}
		path = path.Pop()
		k = FormatPath(path)
	}
}

// tokenRE matches anything shaped like a bootstrap token, so a snippet never
// shows one even when it sits under a misspelled key.
var tokenRE = lazyre.New(`[a-z0-9]{6}\.[a-z0-9]{16}`)

const snippetWidth = 100

// snippet shows the source line at p with a caret under the column.
func (d *document) snippet(p pos) string {
	if p.line > len(d.lines) {
		return ""
	}
	// Redact first: a window could cut a secret in half and hide it from
	// the redaction.
	line, ok := d.redacted[p.line]
	if !ok {
		line = []rune(d.redact(strings.TrimRight(d.lines[p.line-1], "\r")))
		if d.redacted == nil {
			d.redacted = map[int][]rune{}
		}
		d.redacted[p.line] = line
	}
	col := p.col - 1
	if col > len(line) {
		col = len(line)
	}
	// Long lines (one-line JSON) show a window around the column.
	start, end := 0, len(line)
	if end > snippetWidth {
		start = max(0, col-snippetWidth/2)
		end = min(len(line), start+snippetWidth)
	}
	text := string(line[start:end])
	prefix := line[start:col]
	if start > 0 {
		text = "..." + text
		prefix = append([]rune("..."), prefix...)
	}
	if end < len(line) {
		text += "..."
	}
	var caret strings.Builder
	for _, r := range prefix {
		if r == '\t' {
			caret.WriteRune('\t')
		} else {
			caret.WriteByte(' ')
		}
	}
	caret.WriteByte('^')
	num, under := strconv.Itoa(p.line), caret.String()
	if o := d.origin; o != nil && o.Mapped {
		// The line as it is in the outer file: indented, and numbered there.
		text = strings.Repeat(" ", o.Indent) + text
		under = strings.Repeat(" ", o.Indent) + under
		num = strconv.Itoa(p.line + o.LineOffset)
	}
	return fmt.Sprintf("%s | %s\n%s | %s", num, text, strings.Repeat(" ", len(num)), under)
}

// redact masks the secrets in a source line: the values of secret fields,
// anything shaped like a bootstrap token, and the passwords and queries of
// URLs (redact.Replace), each with as many '*' as it has characters.
func (d *document) redact(s string) string {
	for _, secret := range d.secrets {
		// Same length, so the caret still points where it should.
		s = strings.ReplaceAll(s, secret, stars(secret))
	}
	s = tokenRE().ReplaceAllStringFunc(s, func(t string) string { return "******.****************" })
	return redact.Replace(s, stars)
}

func stars(s string) string { return strings.Repeat("*", utf8.RuneCountInString(s)) }

// withAuth gives a fleet config without kubernetes.auth an empty one, which
// LoadConfig's checks allow (the schema requires the member).
func withAuth(root any) {
	m, _ := root.(map[string]any)
	k, _ := m["kubernetes"].(map[string]any)
	if _, ok := k["auth"]; k != nil && !ok {
		k["auth"] = map[string]any{}
	}
}
