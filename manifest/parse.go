package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	jsonpath "github.com/coreos/vcontext/path"
	"go.yaml.in/yaml/v3"

	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/internal/redact"
)

// Limits that keep a hostile manifest from exhausting memory or stack.
const (
	maxSize  = 16 << 20 // bytes
	maxDepth = 64       // nesting levels
	maxNodes = 200000   // values, counting alias expansions
)

// pos is a 1-based line and column (in characters).
type pos struct{ line, col int }

// problem is one finding before it is placed in the source.
type problem struct {
	path jsonpath.ContextPath
	// text marks a problem with the source text rather than with a value
	// (a syntax error): it has no path, only at, when known.
	text bool
	// key places the problem on the member's key rather than its value.
	key bool
	// at overrides the position looked up from path.
	at pos
	// exact: placed at path itself, or nowhere when the source does not
	// spell it out (not at the nearest enclosing value).
	exact bool
	msg   string
}

// document is a parsed manifest: a generic JSON value (map[string]any,
// []any, string, bool, json.Number, nil) and where each value came from.
type document struct {
	file string
	// origin, when set, places the manifest inside the file the user
	// gave (LoadEmbedded).
	origin *Origin
	// config: a fleet config (LoadConfig).
	config bool
	lines  []string
	root   any
	// vals, keys, raw and atKey are keyed by a value's path as FormatPath
	// writes it.
	vals map[string]pos    // path -> position of the value
	keys map[string]pos    // path -> position of the member's key
	raw  map[string]string // path -> scalar as written (for hints)
	// atKey are the paths holding objects, arrays or nothing (null);
	// problems with them point at their key, the line a reader looks for.
	atKey map[string]bool
	// secrets are string values never to be shown in a snippet.
	secrets []string
	// redacted caches each source line with its secrets masked: a
	// one-line JSON manifest with many problems is redacted once, not
	// once per problem.
	redacted map[int][]rune
	nodes    int
	probs    []problem
}

func newDocument(file string, data []byte) *document {
	return &document{
		file:  file,
		lines: strings.Split(string(data), "\n"),
		vals:  map[string]pos{},
		keys:  map[string]pos{},
		raw:   map[string]string{},

		atKey: map[string]bool{},
	}
}

// parse fills d.root from data, JSON when it is JSON (YAML cannot read
// every JSON string escape), YAML otherwise. It returns false when there is
// no document to validate.
func (d *document) parse(data []byte) bool {
	if bytes.HasPrefix(data, []byte("\xef\xbb\xbf")) {
		data = data[3:]
		d.lines = strings.Split(string(data), "\n") // columns count from after the BOM
	}
	if len(data) > maxSize {
		d.syntax(pos{1, 1}, fmt.Sprintf("manifest is %d bytes, more than the %d allowed", len(data), maxSize))
		return false
	}
	if !utf8.Valid(data) {
		d.syntax(pos{1, 1}, "manifest is not valid UTF-8")
		return false
	}
	if strings.HasSuffix(strings.ToLower(d.file), ".json") || json.Valid(data) {
		return d.parseJSON(data)
	}
	return d.parseYAML(data)
}

// --- recording

// add records pr, with a copy of its path: the caller may go on appending
// to the one it built.
func (d *document) add(pr problem) {
	pr.path = pr.path.Copy()
	d.probs = append(d.probs, pr)
}

// syntax records a problem with the source text at (zero when unknown).
func (d *document) syntax(at pos, msg string) {
	d.add(problem{text: true, at: at, msg: msg})
}

// record notes where the value at path is written and returns the key the
// document's maps hold it under.
func (d *document) record(path jsonpath.ContextPath, p pos) string {
	d.nodes++
	k := FormatPath(path)
	if _, ok := d.vals[k]; !ok {
		d.vals[k] = p
	}
	return k
}

// container records an object or array at path.
func (d *document) container(path jsonpath.ContextPath, p pos) {
	d.atKey[d.record(path, p)] = true
}

func (d *document) scalar(path jsonpath.ContextPath, p pos, raw string, v any) {
	k := d.record(path, p)
	d.raw[k] = raw
	if v == nil {
		d.atKey[k] = true
	}
	// A secret's source text is hidden whatever its type; a few
	// characters are not worth hiding and hiding them garbles snippets.
	if isSecretPath(path) && len(raw) >= 4 {
		d.secrets = append(d.secrets, raw)
		if s, ok := v.(string); ok && s != raw {
			d.secrets = append(d.secrets, s)
		}
	}
	// The secret parts of a URL are masked where the line is shown; the
	// decoded value's are kept too, for a source that escapes the URL
	// (JSON's "http:\/\/...") where the line cannot be read as one.
	if s, ok := v.(string); ok && s != raw && strings.Contains(s, "://") {
		redact.Replace(s, func(secret string) string {
			if len(secret) >= 4 {
				d.secrets = append(d.secrets, secret)
			}
			return secret
		})
	}
}

func (d *document) budget(path jsonpath.ContextPath, p pos, depth int) bool {
	if depth > maxDepth {
		d.add(problem{path: path, at: p, msg: fmt.Sprintf("nested more than %d levels deep", maxDepth)})
		return false
	}
	if d.nodes > maxNodes {
		d.add(problem{path: path, at: p, msg: fmt.Sprintf("more than %d values (aliases expanded)", maxNodes)})
		return false
	}
	return true
}

// --- YAML

var yamlLineRE = lazyre.New(`^yaml: line (\d+): (.*)$`)

// yamlError records the YAML parser's error at the line and column of the
// token that broke the document. The parser names only a line, and often
// that of the construct around the mistake (a mapping that starts on line
// 2 for a key indented wrong on line 7, a flow sequence's line for the
// next one); so the document is parsed again, a line at a time, to find
// the last prefix that is still YAML: the line after it broke it.
func (d *document) yamlError(err error, data []byte) {
	msg := err.Error()
	m := yamlLineRE().FindStringSubmatch(msg)
	if m == nil {
		d.syntax(pos{}, "invalid YAML: "+strings.TrimPrefix(msg, "yaml: "))
		return
	}
	line, _ := strconv.Atoi(m[1])
	if broke := brokenLine(data, m[2]); broke > line {
		line = broke
	}
	// No value was parsed, so none is known to be secret: a line that
	// holds one of the secret keys has its value masked in the snippet.
	if v := secretLineRE().FindStringSubmatch(d.line(line)); v != nil && len(v[1]) >= 4 {
		d.secrets = append(d.secrets, v[1])
	}
	d.syntax(pos{line, yamlErrorColumn(d.line(line), m[2])}, "invalid YAML: "+m[2])
}

// secretLineRE matches a source line holding the value of a key that
// isSecretPath names secret (bootstrapToken, an env or header value).
var secretLineRE = lazyre.New(`^\s*(?:-\s+)?(?:bootstrapToken|value)\s*:\s*(\S.*?)\s*$`)

// maxRelocate bounds the lines brokenLine parses again (each a parse of
// a prefix): past it, the parser's own line stands.
const maxRelocate = 2000

// brokenLine is the first line after the longest prefix of data (in
// whole lines) that parses as YAML, where the error is why (a prefix can
// fail for its own reason: a quoted string cut in half); 0 when it cannot
// tell.
func brokenLine(data []byte, why string) int {
	lines := strings.SplitAfter(string(data), "\n")
	if len(lines) > maxRelocate {
		return 0
	}
	prefix := len(data)
	for k := len(lines) - 1; k >= 0; k-- {
		prefix -= len(lines[k])
		err := parsesAsYAML(data[:prefix])
		if err == nil {
			return k + 1
		}
		if m := yamlLineRE().FindStringSubmatch(err.Error()); m == nil || m[2] != why {
			// Broken for another reason: not the prefix to measure from.
			continue
		}
	}
	return 0
}

// parsesAsYAML returns the first error decoding every document in data.
func parsesAsYAML(data []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("yaml: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		if err := dec.Decode(&n); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// yamlErrorColumn guesses the column (1-based, in characters) on text, the
// line that broke the document, of the token the parser's complaint why
// is about: the tab, the unclosed bracket, the second mapping value, the
// character no token starts with; else the line's first token.
func yamlErrorColumn(text, why string) int {
	r := []rune(strings.TrimRight(text, "\r"))
	first := 0
	for first < len(r) && (r[first] == ' ' || r[first] == '\t') {
		first++
	}
	if first == len(r) {
		return 0
	}
	index := func(i int) int { return i + 1 }
	switch {
	case strings.Contains(why, "tab character"):
		for i, c := range r {
			if c == '\t' {
				return index(i)
			}
		}
	case strings.Contains(why, "expected ',' or ']'"), strings.Contains(why, "expected ',' or '}'"), strings.Contains(why, "expected node content"):
		// The bracket left open: the last one on the line not closed on it.
		var open []int
		for i, c := range r {
			switch c {
			case '[', '{':
				open = append(open, i)
			case ']', '}':
				if len(open) > 0 {
					open = open[:len(open)-1]
				}
			}
		}
		if len(open) > 0 {
			return index(open[len(open)-1])
		}
	case strings.Contains(why, "mapping values are not allowed"):
		// The second ": " on the line.
		s := string(r)
		if i := strings.Index(s, ": "); i >= 0 {
			if j := strings.Index(s[i+2:], ": "); j >= 0 {
				return utf8.RuneCountInString(s[:i+2+j]) + 1
			}
		}
	case strings.Contains(why, "cannot start any token"):
		// The value after the key, where such a character usually is.
		s := string(r)
		if i := strings.Index(s, ": "); i >= 0 {
			v := i + 2
			for v < len(s) && s[v] == ' ' {
				v++
			}
			return utf8.RuneCountInString(s[:v]) + 1
		}
	}
	return index(first)
}

// line is the source line n (1-based), "" past the end.
func (d *document) line(n int) string {
	if n < 1 || n > len(d.lines) {
		return ""
	}
	return d.lines[n-1]
}

func (d *document) parseYAML(data []byte) (ok bool) {
	// The YAML parser has panicked on hostile input before; a panic there
	// is bad input, not a crash.
	defer func() {
		if r := recover(); r != nil {
			d.syntax(pos{}, fmt.Sprintf("invalid YAML: %v", r))
			ok = false
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			d.syntax(pos{1, 1}, "manifest is empty")
		} else {
			d.yamlError(err, data)
		}
		return false
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
	case err != nil:
		d.yamlError(err, data)
		return false
	default:
		d.syntax(pos{next.Line, next.Column}, "more than one YAML document; a manifest is a single document")
		return false
	}
	if len(doc.Content) == 0 {
		d.syntax(pos{1, 1}, "manifest is empty")
		return false
	}
	v, ok := d.fromYAML(doc.Content[0], jsonpath.ContextPath{}, 0)
	d.root = v
	return ok
}

func yamlPos(n *yaml.Node) pos { return pos{n.Line, n.Column} }

func (d *document) fromYAML(n *yaml.Node, path jsonpath.ContextPath, depth int) (any, bool) {
	if !d.budget(path, yamlPos(n), depth) {
		return nil, false
	}
	switch n.Kind {
	case yaml.AliasNode:
		if n.Alias == nil {
			d.add(problem{path: path, at: yamlPos(n), msg: "alias to an unknown anchor"})
			return nil, false
		}
		d.record(path, yamlPos(n))
		return d.fromYAML(n.Alias, path, depth+1)
	case yaml.DocumentNode:
		d.add(problem{path: path, at: yamlPos(n), msg: "unexpected YAML document"})
		return nil, false
	case yaml.SequenceNode:
		d.container(path, yamlPos(n))
		arr := make([]any, 0, len(n.Content))
		for i, c := range n.Content {
			v, ok := d.fromYAML(c, path.Append(i), depth+1)
			if !ok {
				return nil, false
			}
			arr = append(arr, v)
		}
		return arr, true
	case yaml.MappingNode:
		d.container(path, yamlPos(n))
		obj := map[string]any{}
		if !d.members(n, path, depth, obj) {
			return nil, false
		}
		return obj, true
	case yaml.ScalarNode:
		return d.yamlScalar(n, path)
	}
	d.add(problem{path: path, at: yamlPos(n), msg: "unsupported YAML node"})
	return nil, false
}

// members adds the members of mapping n to obj, skipping keys obj already
// has. Explicit keys are added before the mappings merged with "<<", so
// they win, and among merged mappings the first wins (YAML merge keys).
func (d *document) members(n *yaml.Node, path jsonpath.ContextPath, depth int, obj map[string]any) bool {
	if len(n.Content)%2 != 0 {
		d.add(problem{path: path, at: yamlPos(n), msg: "malformed mapping"})
		return false
	}
	var merges []*yaml.Node
	firstAt := map[string]int{}
	for i := 0; i < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		d.nodes++ // merged keys cost time even when skipped
		if k.Kind == yaml.AliasNode && k.Alias != nil {
			k = k.Alias
		}
		if k.Kind == yaml.ScalarNode && k.ShortTag() == "!!merge" {
			merges = append(merges, v)
			continue
		}
		if k.Kind != yaml.ScalarNode || k.ShortTag() != "!!str" {
			what := map[string]string{"!!int": "an integer", "!!float": "a number", "!!bool": "a boolean", "!!null": "null"}[k.ShortTag()]
			if what == "" {
				what = "not a string"
			}
			msg := fmt.Sprintf("keys must be strings, this one is %s", what)
			if k.Kind == yaml.ScalarNode {
				msg += fmt.Sprintf(" (quote it: %q)", k.Value)
			}
			d.add(problem{path: path, at: yamlPos(k), msg: msg})
			continue
		}
		name := k.Value
		if line, dup := firstAt[name]; dup {
			d.add(problem{path: path.Append(name), at: yamlPos(k), msg: fmt.Sprintf("duplicate key %q (first at line %d)", name, line)})
			continue
		}
		firstAt[name] = k.Line
		if _, ok := obj[name]; ok {
			continue // an explicit key, or an earlier merge, set it
		}
		p := path.Append(name)
		d.keys[FormatPath(p)] = yamlPos(k)
		val, ok := d.fromYAML(v, p, depth+1)
		if !ok {
			return false
		}
		obj[name] = val
	}
	for _, m := range merges {
		if m.Kind == yaml.AliasNode && m.Alias != nil {
			m = m.Alias
		}
		srcs := []*yaml.Node{m}
		if m.Kind == yaml.SequenceNode {
			srcs = m.Content
		}
		for _, s := range srcs {
			if s.Kind == yaml.AliasNode && s.Alias != nil {
				s = s.Alias
			}
			if s.Kind != yaml.MappingNode {
				d.add(problem{path: path, at: yamlPos(s), msg: "a merge key (<<) takes a mapping or a list of mappings"})
				continue
			}
			if !d.budget(path, yamlPos(s), depth+1) || !d.members(s, path, depth+1, obj) {
				return false
			}
		}
	}
	return true
}

func (d *document) yamlScalar(n *yaml.Node, path jsonpath.ContextPath) (any, bool) {
	p := yamlPos(n)
	var v any
	switch tag := n.ShortTag(); tag {
	case "!!str", "!!timestamp", "!!binary":
		v = n.Value
	case "!!null":
		v = nil
	case "!!bool":
		var b bool
		if err := n.Decode(&b); err != nil {
			d.add(problem{path: path, at: p, msg: "not a valid boolean"})
			return nil, false
		}
		v = b
	case "!!int":
		var i int64
		var u uint64
		if err := n.Decode(&i); err == nil {
			v = json.Number(strconv.FormatInt(i, 10))
		} else if err := n.Decode(&u); err == nil {
			v = json.Number(strconv.FormatUint(u, 10))
		} else {
			d.add(problem{path: path, at: p, msg: "integer out of range (quote it if it is meant as a string)"})
			return nil, false
		}
	case "!!float":
		var f float64
		if err := n.Decode(&f); err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			d.add(problem{path: path, at: p, msg: "not a finite number (quote it if it is meant as a string)"})
			return nil, false
		}
		v = json.Number(strconv.FormatFloat(f, 'g', -1, 64))
	default:
		d.add(problem{path: path, at: p, msg: fmt.Sprintf("unsupported YAML tag %s", tag)})
		return nil, false
	}
	d.scalar(path, p, n.Value, v)
	return v, true
}

// --- JSON

type jsonParser struct {
	d      *document
	data   []byte
	dec    *json.Decoder
	lineAt []int // offsets where lines start
}

func (d *document) parseJSON(data []byte) bool {
	p := &jsonParser{d: d, data: data, dec: json.NewDecoder(bytes.NewReader(data)), lineAt: []int{0}}
	p.dec.UseNumber()
	for i, c := range data {
		if c == '\n' {
			p.lineAt = append(p.lineAt, i+1)
		}
	}
	v, ok := p.value(jsonpath.ContextPath{}, 0)
	if !ok {
		return false
	}
	if _, err := p.dec.Token(); !errors.Is(err, io.EOF) {
		d.syntax(p.pos(p.skip(int(p.dec.InputOffset()))), "invalid JSON: data after the document")
		return false
	}
	d.root = v
	return true
}

func (p *jsonParser) pos(off int) pos {
	line := sort.Search(len(p.lineAt), func(i int) bool { return p.lineAt[i] > off }) - 1
	if line < 0 {
		line = 0
	}
	start := p.lineAt[line]
	if off > len(p.data) {
		off = len(p.data)
	}
	return pos{line + 1, utf8.RuneCount(p.data[start:off]) + 1}
}

// skip returns the offset of the next token at or after off.
func (p *jsonParser) skip(off int) int {
	for off < len(p.data) {
		switch p.data[off] {
		case ' ', '\t', '\r', '\n', ',', ':':
			off++
		default:
			return off
		}
	}
	return off
}

func (p *jsonParser) fail(err error) {
	off := int(p.dec.InputOffset())
	var se *json.SyntaxError
	if errors.As(err, &se) {
		off = int(se.Offset)
	}
	msg := err.Error()
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		msg = "unexpected end of input"
	}
	p.d.syntax(p.pos(off), "invalid JSON: "+msg)
}

func (p *jsonParser) value(path jsonpath.ContextPath, depth int) (any, bool) {
	off := p.skip(int(p.dec.InputOffset()))
	at := p.pos(off)
	if !p.d.budget(path, at, depth) {
		return nil, false
	}
	tok, err := p.dec.Token()
	if err != nil {
		p.fail(err)
		return nil, false
	}
	switch t := tok.(type) {
	case json.Delim:
		p.d.container(path, at)
		if t == '[' {
			arr := []any{}
			for p.dec.More() {
				v, ok := p.value(path.Append(len(arr)), depth+1)
				if !ok {
					return nil, false
				}
				arr = append(arr, v)
			}
			if _, err := p.dec.Token(); err != nil {
				p.fail(err)
				return nil, false
			}
			return arr, true
		}
		obj := map[string]any{}
		firstAt := map[string]int{}
		for p.dec.More() {
			kat := p.pos(p.skip(int(p.dec.InputOffset())))
			ktok, err := p.dec.Token()
			if err != nil {
				p.fail(err)
				return nil, false
			}
			name, _ := ktok.(string)
			cp := path.Append(name)
			if line, dup := firstAt[name]; dup {
				p.d.add(problem{path: cp, at: kat, msg: fmt.Sprintf("duplicate key %q (first at line %d)", name, line)})
				var skip json.RawMessage
				if err := p.dec.Decode(&skip); err != nil {
					p.fail(err)
					return nil, false
				}
				continue
			}
			firstAt[name] = kat.line
			p.d.keys[FormatPath(cp)] = kat
			v, ok := p.value(cp, depth+1)
			if !ok {
				return nil, false
			}
			obj[name] = v
		}
		if _, err := p.dec.Token(); err != nil {
			p.fail(err)
			return nil, false
		}
		return obj, true
	default:
		raw := ""
		if end := int(p.dec.InputOffset()); off <= end && end <= len(p.data) {
			raw = string(p.data[off:end])
		}
		p.d.scalar(path, at, raw, t)
		return t, true
	}
}
