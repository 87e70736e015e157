package plan

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/redact"
)

// Redacted replaces secret file contents, and the secret parts of URLs,
// in every printed plan.
const Redacted = redact.Marker

// Redact returns a copy of the plan with secret contents replaced, and the
// passwords and queries of its URLs (redact.URL), for printing. The
// original keeps its secrets for apply.
func (p *Plan) Redact() *Plan { return p.redact(false) }

// RedactKeepingDigests is Redact that records each secret's digest in
// File.Digest, and in each hidden part of a URL, for a plan that is
// stored and compared with the next one (never printed: a digest of a
// weak secret could be guessed back).
func (p *Plan) RedactKeepingDigests() *Plan { return p.redact(true) }

// storedURLSecret starts what a stored plan keeps of a URL's secret part:
// its sha256, in hex.
const storedURLSecret = "redacted-sha256-"

func (p *Plan) redact(digests bool) *Plan {
	hide := func(secret string) string { return Redacted }
	if digests {
		// A changed password is a changed plan, as a changed token is. The
		// digest is written as URL characters, so that a stored URL is
		// still read as one: printed, its digest is hidden in turn, and
		// redacting it again keeps it.
		hide = func(secret string) string {
			if strings.HasPrefix(secret, storedURLSecret) {
				return secret
			}
			return storedURLSecret + digest.FromString(secret).Encoded()
		}
	}
	text := func(s string) string { return redact.Replace(s, hide) }
	out := *p
	out.Warnings = make([]string, len(p.Warnings))
	for i, w := range p.Warnings {
		out.Warnings[i] = text(w)
	}
	if p.Warnings == nil {
		out.Warnings = nil
	}
	out.Steps = make([]Step, len(p.Steps))
	for i, s := range p.Steps {
		s.Summary = text(s.Summary)
		if s.File != nil && s.File.Secret && s.File.Contents != Redacted {
			f := *s.File
			if digests {
				f.Digest = digest.FromString(f.Encoding + ":" + f.Contents).String()
			}
			f.Contents, f.Encoding = Redacted, ""
			s.File = &f
		}
		if s.File != nil && s.File.Secret && !digests {
			f := *s.File
			f.Digest = ""
			s.File = &f
		}
		if s.File != nil && s.File.Source != nil {
			f, src := *s.File, *s.File.Source
			src.URL = text(src.URL)
			f.Source = &src
			s.File = &f
		}
		if d := s.Download; d != nil {
			c := *d
			c.URL, c.ChecksumURL = text(c.URL), text(c.ChecksumURL)
			s.Download = &c
		}
		if s.Image != nil && s.Image.Debootstrap != nil {
			img, db := *s.Image, *s.Image.Debootstrap
			db.Mirror = text(db.Mirror)
			img.Debootstrap = &db
			s.Image = &img
		}
		out.Steps[i] = s
	}
	return &out
}

// WriteJSON prints the plan as indented JSON, secrets redacted. The shape is
// the Plan type's JSON, identified by its "version" field (plan.Version).
func WriteJSON(w io.Writer, p *Plan) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(p.Redact())
}

// WriteText prints the plan for people: grouped by phase, each step with
// its id and what it changes, each file with its mode, owner and contents,
// secrets redacted.
func WriteText(w io.Writer, p *Plan) error {
	p = p.Redact()
	// Buffered: a plan is hundreds of short writes, each a write(2) on
	// an unbuffered stdout.
	bw := bufio.NewWriterSize(w, 32<<10)
	tw := &errWriter{w: bw}
	tw.printf("Plan %s: machine %s, node %s, rootfs %s\n", p.Version, p.Machine, p.NodeName, p.Rootfs)
	for _, warning := range p.Warnings {
		tw.printf("warning: %s\n", warning)
	}
	if len(p.HostUnits) > 0 {
		tw.printf("host units the node needs running: %s\n", strings.Join(p.HostUnits, ", "))
	}
	for _, ph := range Phases {
		var steps []Step
		for _, s := range p.Steps {
			if s.Phase == ph {
				steps = append(steps, s)
			}
		}
		if len(steps) == 0 {
			continue
		}
		tw.printf("\n== %s (%d steps)\n", ph, len(steps))
		for _, s := range steps {
			tw.printf("\n[%s] %s\n", s.ID, s.Summary)
			if len(s.After) > 0 {
				tw.printf("  after: %s\n", strings.Join(s.After, ", "))
			}
			writeDetail(tw, &s)
		}
	}
	if tw.err == nil {
		tw.err = bw.Flush()
	}
	return tw.err
}

func writeDetail(w *errWriter, s *Step) {
	switch {
	case s.File != nil:
		f := s.File
		keep := ""
		if !f.Overwrite {
			keep = ", kept if present"
		}
		w.printf("  file %s  mode %04o  owner %s%s\n", f.Path, f.Mode, ownerString(f.Owner), keep)
		switch {
		case f.Source != nil:
			w.printf("  contents from %s (verified: %s)\n", f.Source.URL, orNone(f.Source.Hash))
		case f.Secret:
			w.printf("  | %s\n", Redacted)
		case f.Encoding == "base64":
			w.printf("  | <%d bytes of binary data, base64 in -o json>\n", len(f.Contents)*3/4)
		default:
			for _, line := range strings.Split(strings.TrimSuffix(f.Contents, "\n"), "\n") {
				w.printf("  | %s\n", line)
			}
		}
	case s.Directory != nil:
		d := s.Directory
		w.printf("  directory %s  mode %04o  owner %s\n", d.Path, d.Mode, ownerString(d.Owner))
	case s.Link != nil:
		kind := "symlink"
		if s.Link.Hard {
			kind = "hard link"
		}
		w.printf("  %s %s -> %s\n", kind, s.Link.Path, s.Link.Target)
	case s.Packages != nil:
		w.printf("  packages: %s (install when missing: %t)\n", strings.Join(s.Packages.Names, " "), s.Packages.Install)
	case s.Modules != nil:
		w.printf("  modprobe %s\n", strings.Join(s.Modules.Names, " "))
	case s.Sysctl != nil:
		for _, kv := range s.Sysctl.Values {
			w.printf("  %s = %s\n", kv.Key, kv.Value)
		}
	case s.Swap != nil:
		w.printf("  swapoff -a; comment out swap entries in %s\n", s.Swap.Fstab)
	case s.Image != nil:
		i := s.Image
		switch {
		case i.Reference != "":
			w.printf("  image %s  platform %s\n", i.Reference, i.Platform)
		case i.Layout != "":
			w.printf("  OCI layout %s  reference %s  platform %s\n", i.Layout, i.LayoutRef, i.Platform)
		case i.Debootstrap != nil:
			w.printf("  debootstrap %s %s  include %s\n", i.Debootstrap.Suite, i.Debootstrap.Mirror, strings.Join(i.Debootstrap.Include, ","))
		}
		if len(i.PlainHTTP) > 0 {
			w.printf("  plain HTTP registries: %s\n", strings.Join(i.PlainHTTP, ", "))
		}
		w.printf("  into %s\n", i.Dest)
		if l := i.Layers; l != nil {
			deep := "refused"
			if l.FlattenFallback {
				deep = "flattened"
			}
			w.printf("  layer store %s  overlay dir %s  at most %d layers per mount (more: %s)\n", l.Store, l.Dir, l.MaxLayers, deep)
		}
	case s.Download != nil:
		d := s.Download
		w.printf("  url %s\n", d.URL)
		if d.SHA256 != "" {
			w.printf("  sha256 %s\n", d.SHA256)
		} else {
			w.printf("  sha256 from %s\n", d.ChecksumURL)
		}
		if d.Archive != "" {
			w.printf("  %s archive into %s\n", d.Archive, d.Dest)
			for _, m := range d.Members {
				w.printf("    %s -> %s\n", m.Path, m.Dest)
			}
		} else {
			w.printf("  install %s mode %04o\n", d.Dest, d.Mode)
		}
	case s.Wait != nil:
		w.printf("  machine %s, units %s, timeout %ds\n", s.Wait.Machine, strings.Join(s.Wait.Units, " "), s.Wait.TimeoutSeconds)
	}
}

func ownerString(o Owner) string {
	u, g := fmt.Sprint(o.UID), fmt.Sprint(o.GID)
	if o.User != "" {
		u = o.User
	}
	if o.Group != "" {
		g = o.Group
	}
	return u + ":" + g
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// errWriter keeps the first write error so printing code stays linear.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) printf(format string, args ...any) {
	if e.err == nil {
		_, e.err = fmt.Fprintf(e.w, format, args...)
	}
}
