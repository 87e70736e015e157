package render

import (
	"fmt"
	"math"
	"path"
	"strings"

	igntypes "github.com/coreos/ignition/v2/config/v3_5/types"
	"github.com/vincent-petithory/dataurl"

	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// renderExtras turns the manifest's Ignition-form files, directories, links and
// units into steps: the host's in the host phase, the machine's inside the
// rootfs in the machine phase. Each step remembers the manifest entry it
// comes from, so a clash with another step is reported there.
func (r *renderer) renderExtras() error {
	if err := r.extra(plan.PhaseHost, "$.host.extra", r.m.Host.Extra, func(p string) string { return p }); err != nil {
		return err
	}
	return r.extra(plan.PhaseMachine, "$.machine.extra", r.m.Machine.Extra, r.inRoot)
}

func (r *renderer) extra(ph plan.Phase, at string, x manifest.Extra, place func(string) string) error {
	for i, d := range x.Storage.Directories {
		s := r.dir(ph, place(d.Path), uint32(intOr(d.Mode, 0o755)), "extra directory "+d.Path)
		s.Directory.Owner = owner(d.Node)
		s.Origin = fmt.Sprintf("%s.storage.directories[%d].path", at, i)
	}
	for i, f := range x.Storage.Files {
		where := fmt.Sprintf("%s.storage.files[%d]", at, i)
		data, src, err := fileContents(f)
		if err != nil {
			return &Error{where + ".contents", err.Error()}
		}
		s := r.file(ph, place(f.Path), "", "extra file "+f.Path, mode(uint32(intOr(f.Mode, 0o644))), owned(owner(f.Node)))
		setContents(s.File, data)
		s.File.Source = src
		// Ignition fails on an existing file unless overwrite is true; a
		// provisioner that converges on reruns owns its files instead, and
		// an explicit overwrite: false keeps what is there.
		s.File.Overwrite = f.Overwrite == nil || *f.Overwrite
		s.Origin = where + ".path"
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
		s.Origin = fmt.Sprintf("%s.storage.links[%d].path", at, i)
	}
	for i, u := range x.Systemd.Units {
		r.unit(ph, fmt.Sprintf("%s.systemd.units[%d]", at, i), u, place)
	}
	return nil
}

// unit writes, masks or enables one extra unit. Load has refused what
// cannot be enabled: a machine unit without contents, a unit without an
// [Install] target, a template.
func (r *renderer) unit(ph plan.Phase, at string, u igntypes.Unit, place func(string) string) {
	unitPath := path.Join(unitDir, u.Name)
	if u.Mask != nil && *u.Mask {
		r.link(ph, place(unitPath), "/dev/null", "mask "+u.Name).Origin = at + ".mask"
		return
	}
	if u.Contents != nil {
		r.file(ph, place(unitPath), *u.Contents, "extra unit "+u.Name).Origin = at + ".name"
	}
	for j, d := range u.Dropins {
		if d.Contents == nil {
			continue
		}
		p := path.Join(unitDir, u.Name+".d", d.Name)
		r.file(ph, place(p), *d.Contents, "drop-in "+d.Name+" for "+u.Name).Origin = fmt.Sprintf("%s.dropins[%d].name", at, j)
	}
	if u.Enabled == nil || !*u.Enabled {
		return
	}
	if u.Contents == nil {
		if ph == plan.PhaseHost {
			r.systemd("enable", u.Name, "start:systemd:daemon-reload").Origin = at + ".enabled"
		}
		return
	}
	for _, t := range manifest.InstallTargets(*u.Contents) {
		dir := t.Target + ".wants"
		if t.Requires {
			dir = t.Target + ".requires"
		}
		r.link(ph, place(path.Join(unitDir, dir, u.Name)), path.Join(unitDir, u.Name), "enable "+u.Name+" for "+t.Target).Origin = at + ".enabled"
	}
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
