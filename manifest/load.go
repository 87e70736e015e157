package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	jsonpath "github.com/coreos/vcontext/path"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"golang.org/x/text/language"
	"golang.org/x/text/message"

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
	if err := sch.Validate(d.root); err != nil {
		var ve *jsonschema.ValidationError
		if !errors.As(err, &ve) {
			return nil, fmt.Errorf("validate %s against the schema: %w", filename, err)
		}
		var prune []jsonpath.ContextPath
		flagged, prune, shapes = d.schemaProblems(sch, ve)
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

var printer = message.NewPrinter(language.English)

// schemaProblems turns the validation error tree into short messages, one
// per leaf. It returns the paths it flagged and those of the values the
// schema refused, and apart from them the values whose shape (a pattern)
// the schema refused: the semantic checks test the same shape and say
// what is wrong in the field's own words (shapeProblems).
func (d *document) schemaProblems(sch *jsonschema.Schema, ve *jsonschema.ValidationError) (flagged, prune, shapes []jsonpath.ContextPath) {
	var walk func(e *jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		if len(e.Causes) > 0 {
			for _, c := range e.Causes {
				walk(c)
			}
			return
		}
		path := d.instancePath(e.InstanceLocation)
		switch k := e.ErrorKind.(type) {
		case *kind.AdditionalProperties:
			allowed := propertyNames(schemaAt(sch, path))
			for _, name := range k.Properties {
				p := path.Append(name).Copy()
				d.add(problem{path: p, key: true, msg: unknownField(name, allowed)})
				flagged = append(flagged, p)
				prune = append(prune, p)
			}
			return
		case *kind.Required:
			for _, name := range k.Missing {
				d.add(problem{path: path, key: true, msg: fmt.Sprintf("missing required field %q", name)})
				flagged = append(flagged, path.Append(name).Copy())
			}
			return
		case *kind.Pattern:
			shapes = append(shapes, path)
			return
		}
		d.add(problem{path: path, msg: d.schemaMessage(path, schemaAt(sch, path), e.ErrorKind)})
		flagged = append(flagged, path)
		prune = append(prune, path)
	}
	walk(ve)
	return flagged, prune, shapes
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

// schemaMessage words the schema's complaint k about the value at path,
// whose schema is s (nil when unknown).
func (d *document) schemaMessage(path jsonpath.ContextPath, s *jsonschema.Schema, k jsonschema.ErrorKind) string {
	raw := d.raw[FormatPath(path)]
	switch k := k.(type) {
	case *kind.Type:
		msg := fmt.Sprintf("must be %s, not %s", typeNames(k.Want), article(k.Got))
		switch {
		case k.Got == "null" && path.Len() > 0:
			msg += " (the key has no value)"
		case !contains(k.Want, "string") || k.Got == "object" || k.Got == "array" || isSecretPath(path):
		case s != nil && (s.Enum != nil || s.Const != nil):
			// Quoting what was written does not help when the quoted
			// text is not one of the allowed strings either.
			return choiceMessage(path, s, k.Got, raw)
		default:
			msg += fmt.Sprintf(" (quote it: %q)", raw)
		}
		return msg
	case *kind.Enum:
		want := make([]string, len(k.Want))
		for i, w := range k.Want {
			want[i] = fmt.Sprint(w)
		}
		msg := "must be one of " + strings.Join(want, ", ")
		if got, ok := k.Got.(string); ok && !isSecretPath(path) {
			if best, ok := closest(got, want); ok {
				msg += fmt.Sprintf(" (did you mean %q?)", best)
			}
		}
		return msg
	case *kind.Const:
		if got, ok := k.Got.(string); ok && !isSecretPath(path) {
			return fmt.Sprintf("must be %q, not %q", fmt.Sprint(k.Want), got)
		}
		return fmt.Sprintf("must be %q", fmt.Sprint(k.Want))
	case *kind.MinLength:
		if k.Want == 1 {
			return "must not be empty"
		}
		return fmt.Sprintf("must be at least %d characters long", k.Want)
	case *kind.Minimum:
		return fmt.Sprintf("must be at least %s", k.Want.RatString())
	case *kind.Maximum:
		return fmt.Sprintf("must be at most %s", k.Want.RatString())
	}
	return k.LocalizedString(printer)
}

// choiceMessage is the message for a boolean or number where one of a few
// strings (an enum or a const) is wanted. YAML 1.1 tools (PyYAML,
// sigs.k8s.io/yaml, Helm, kustomize) turn on, off, yes and no into booleans
// before nodespawn sees them, so gpu: on arrives as gpu: true; the hint
// names the quoted string that survives them.
func choiceMessage(path jsonpath.ContextPath, s *jsonschema.Schema, got, raw string) string {
	var allowed []string
	if s.Enum != nil {
		for _, v := range s.Enum.Values {
			allowed = append(allowed, fmt.Sprint(v))
		}
	} else {
		allowed = []string{fmt.Sprint(*s.Const)}
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

// instancePath turns the schema library's location, a list of strings,
// into a path, telling array indexes from member names by the document:
// a token into an array is an index.
func (d *document) instancePath(loc []string) jsonpath.ContextPath {
	elems, v := make([]any, 0, len(loc)), d.root
	for _, tok := range loc {
		switch x := v.(type) {
		case []any:
			i, _ := strconv.Atoi(tok)
			elems = append(elems, i)
			v = nil
			if i >= 0 && i < len(x) {
				v = x[i]
			}
		case map[string]any:
			elems = append(elems, tok)
			v = x[tok]
		default:
			elems = append(elems, tok)
			v = nil
		}
	}
	return jsonpath.New("", elems...)
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
			s = s.Items2020
			continue
		}
		key, _ := e.(string)
		if p, ok := s.Properties[key]; ok {
			s = p
		} else if ap, ok := s.AdditionalProperties.(*jsonschema.Schema); ok {
			s = ap
		} else {
			return nil
		}
	}
	return deref(s)
}

func deref(s *jsonschema.Schema) *jsonschema.Schema {
	for s != nil && s.Ref != nil && s.Properties == nil {
		s = s.Ref
	}
	return s
}

func propertyNames(s *jsonschema.Schema) []string {
	if s == nil {
		return nil
	}
	names := make([]string, 0, len(s.Properties))
	for n := range s.Properties {
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
