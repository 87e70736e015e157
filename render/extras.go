package render

import (
	"fmt"
	"math"
	"path"
	"strings"

	igntypes "github.com/coreos/ignition/v2/config/v3_5/types"
	jsonpath "github.com/coreos/vcontext/path"
	"github.com/vincent-petithory/dataurl"

	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// renderExtras turns the manifest's Ignition-form files, directories, links and
// units into steps: the host's in the host phase, the machine's inside the
// rootfs in the machine phase. Each step remembers the manifest entry it
// comes from, so a clash with another step is reported there.
func (r *renderer) renderExtras() error {
	if err := r.extra(plan.PhaseHost, field("host", "extra"), r.m.Host.Extra, func(p string) string { return p }); err != nil {
		return err
	}
	return r.extra(plan.PhaseMachine, field("machine", "extra"), r.m.Machine.Extra, r.inRoot)
}

func (r *renderer) extra(ph plan.Phase, at jsonpath.ContextPath, x manifest.Extra, place func(string) string) error {
	for i, d := range x.Storage.Directories {
		s := r.dir(ph, place(d.Path), uint32(intOr(d.Mode, 0o755)), "extra directory "+d.Path)
		s.Directory.Owner = owner(d.Node)
		r.from(s, at.Append("storage", "directories", i, "path"))
	}
	for i, f := range x.Storage.Files {
		where := at.Append("storage", "files", i)
		data, src, err := fileContents(f)
		if err != nil {
			return &Error{Path: where.Append("contents").Copy(), Msg: err.Error()}
		}
		s := r.file(ph, place(f.Path), "", "extra file "+f.Path, mode(uint32(intOr(f.Mode, 0o644))), owned(owner(f.Node)))
		setContents(s.File, data)
		s.File.Source = src
		// Ignition fails on an existing file unless overwrite is true; a
		// provisioner that converges on reruns owns its files instead, and
		// an explicit overwrite: false keeps what is there.
		s.File.Overwrite = f.Overwrite == nil || *f.Overwrite
		r.from(s, where.Append("path"))
	}
	for i, l := range x.Storage.Links {
		target := ""
		if l.Target != nil {
			target = *l.Target
		}
		s := r.link(ph, place(l.Path), target, "extra link "+l.Path)
		s.Link.Hard = l.Hard != nil && *l.Hard
		if s.Link.Hard {
			// A hard link's target is a path on the same tree.
			s.Link.Target = place(target)
		}
		s.Link.Owner = owner(l.Node)
		r.from(s, at.Append("storage", "links", i, "path"))
	}
	for i, u := range x.Systemd.Units {
		r.unit(ph, at.Append("systemd", "units", i), u, place)
	}
	return nil
}

// unit writes, masks or enables one extra unit. Load has refused what
// cannot be enabled: a machine unit without contents, a unit without an
// [Install] target, a template.
func (r *renderer) unit(ph plan.Phase, at jsonpath.ContextPath, u igntypes.Unit, place func(string) string) {
	unitPath := path.Join(layout.UnitDir, u.Name)
	if u.Mask != nil && *u.Mask {
		r.from(r.link(ph, place(unitPath), "/dev/null", "mask "+u.Name), at.Append("mask"))
		return
	}
	if u.Contents != nil {
		r.from(r.file(ph, place(unitPath), *u.Contents, "extra unit "+u.Name), at.Append("name"))
	}
	for j, d := range u.Dropins {
		if d.Contents == nil {
			continue
		}
		p := path.Join(layout.UnitDir, u.Name+".d", d.Name)
		r.from(r.file(ph, place(p), *d.Contents, "drop-in "+d.Name+" for "+u.Name), at.Append("dropins", j, "name"))
	}
	if u.Enabled == nil || !*u.Enabled {
		return
	}
	if u.Contents == nil {
		if ph == plan.PhaseHost {
			r.from(r.systemd("enable", u.Name, "start:systemd:daemon-reload"), at.Append("enabled"))
		}
		return
	}
	for _, t := range manifest.InstallTargets(*u.Contents) {
		dir := t.Target + ".wants"
		if t.Requires {
			dir = t.Target + ".requires"
		}
		r.from(r.link(ph, place(path.Join(layout.UnitDir, dir, u.Name)), path.Join(layout.UnitDir, u.Name), "enable "+u.Name+" for "+t.Target), at.Append("enabled"))
	}
}

// from records that step s comes from the manifest entry at p, where a
// clash with another step is reported. s.Origin holds p as users read it;
// r.origins keeps the path itself under that text, for the Error.
func (r *renderer) from(s *plan.Step, p jsonpath.ContextPath) {
	s.Origin = manifest.FormatPath(p)
	if r.origins == nil {
		r.origins = map[string]jsonpath.ContextPath{}
	}
	r.origins[s.Origin] = p.Copy()
}

// fileContents decodes an Ignition file's contents: data: URLs (optionally
// gzip-compressed) become bytes now; http(s) sources are fetched at apply
// time against their verification hash.
func fileContents(f igntypes.File) ([]byte, *plan.Source, error) {
	c := f.Contents
	if c.Source == nil || *c.Source == "" {
		return nil, nil, nil
	}
	compression := ""
	if c.Compression != nil {
		compression = *c.Compression
	}
	src := *c.Source
	if !strings.HasPrefix(src, "data:") {
		s := &plan.Source{URL: src, Compression: compression}
		if c.Verification.Hash != nil {
			s.Hash = *c.Verification.Hash
		}
		return nil, s, nil
	}
	du, err := dataurl.DecodeString(src)
	if err != nil {
		return nil, nil, fmt.Errorf("bad data URL: %w", err)
	}
	data := du.Data
	if compression == "gzip" {
		// manifest.Load checked the contents decompress within its bound.
		if data, err = inflate.Gzip(data, math.MaxInt32); err != nil {
			return nil, nil, fmt.Errorf("gzip contents: %w", err)
		}
	}
	return data, nil, nil
}

func intOr(p *int, def int) int {
	if p == nil {
		return def
	}
	return *p
}

// owner maps an Ignition node's user and group onto an Owner.
func owner(n igntypes.Node) plan.Owner {
	var o plan.Owner
	if n.User.ID != nil {
		o.UID = *n.User.ID
	}
	if n.User.Name != nil {
		o.User = *n.User.Name
	}
	if n.Group.ID != nil {
		o.GID = *n.Group.ID
	}
	if n.Group.Name != nil {
		o.Group = *n.Group.Name
	}
	return o
}
