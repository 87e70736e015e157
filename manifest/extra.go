package manifest

import (
	"net/url"
	"path"

	igntypes "github.com/coreos/ignition/v2/config/v3_5/types"
	ignvalidate "github.com/coreos/ignition/v2/config/validate"
	jsonpath "github.com/coreos/vcontext/path"
	"github.com/coreos/vcontext/report"
	"github.com/vincent-petithory/dataurl"

	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/internal/layout"
)

// Host paths that belong to nodespawn itself (package layout says where):
// apply keeps its state, result record and download cache under
// layout.StateDir and takes layout.LockFile while it runs; nodespawn
// install writes the first-boot unit and its boot link.
const (
	stateDir      = layout.StateDir
	lockFile      = layout.LockFile
	firstbootUnit = layout.FirstbootUnit
)

// firstbootPaths are where nodespawn install puts the first-boot unit and
// the link that enables it.
var firstbootPaths = []string{layout.FirstbootUnitPath, layout.FirstbootWantsLink}

// maxExtraInflated bounds what the gzip-compressed data: contents of extra
// files decompress to, all together: render holds every file in memory.
const maxExtraInflated = 64 << 20

// maxInflated bounds what one gzip-compressed file may decompress to.
const maxInflated = 32 << 20

// extra checks the Ignition-form files, directories, links and units at p
// (the host's when host is true, else the machine's): what nodespawn
// supports, then Ignition's own validation.
func (c *checker) extra(p jsonpath.ContextPath, x *Extra, host bool) {
	before := len(c.probs)
	for i, d := range x.Storage.Directories {
		c.nodePath(p.Append("storage", "directories", i, "path"), d.Path, host, true)
	}
	for i, f := range x.Storage.Files {
		fp := p.Append("storage", "files", i)
		c.nodePath(fp.Append("path"), f.Path, host, false)
		if len(f.Append) > 0 {
			c.add(fp.Append("append"), "append is not supported; put the whole file in contents")
		}
		c.resource(fp.Append("contents"), f.Contents)
	}
	for i, l := range x.Storage.Links {
		lp := p.Append("storage", "links", i)
		c.nodePath(lp.Append("path"), l.Path, host, false)
		switch {
		case l.Target == nil || *l.Target == "":
			c.add(lp.Append("target"), "a link needs a target")
		case l.Hard != nil && *l.Hard:
			// A symbolic link may point anywhere, relative or not; a hard
			// link's target is opened as a path in the same tree.
			c.cleanPath(lp.Append("target"), *l.Target, "a hard link's target must be an absolute path")
		}
	}
	for i, u := range x.Systemd.Units {
		c.unit(p.Append("systemd", "units", i), u, host)
	}
	ours := map[string]bool{} // by FormatPath
	for _, pr := range c.probs[before:] {
		ours[FormatPath(pr.path)] = true
	}

	cfg := igntypes.Config{
		Ignition: igntypes.Ignition{Version: "3.5.0"},
		Storage: igntypes.Storage{
			Directories: x.Storage.Directories,
			Files:       x.Storage.Files,
			Links:       x.Storage.Links,
		},
		Systemd: x.Systemd,
	}
	rep := ignvalidate.ValidateWithContext(cfg, nil)
	for _, e := range rep.Entries {
		if e.Kind != report.Error {
			continue
		}
		// Ignition names the value by the same kind of path, from its
		// config's root, which is p here.
		ep := p.Append(e.Context.Path...)
		if ours[FormatPath(ep)] {
			continue // already said, in nodespawn's words
		}
		c.add(ep, "%s", e.Message)
	}
}

// nodePath checks the path of an extra file, directory (dir) or link.
func (c *checker) nodePath(p jsonpath.ContextPath, v string, host, dir bool) {
	if !c.cleanPath(p, v, "must be an absolute path") {
		return
	}
	switch {
	case v == "/":
		c.add(p, "must name something below /, not / itself")
	case host && (v == stateDir || inside(v, stateDir)):
		c.add(p, "%s holds nodespawn's own state (result record, downloads); put your files elsewhere", stateDir)
	case host && v == lockFile:
		c.add(p, "%s is the lock apply holds while it runs; choose another path", lockFile)
	case host && contains(firstbootPaths, v):
		c.add(p, "%s is nodespawn's first-boot unit, which nodespawn install writes and enables; give it a drop-in under %s.d instead", v, firstbootPaths[0])
	case host && !dir && (inside(stateDir, v) || inside(lockFile, v)):
		c.add(p, "a file or link here would stand where nodespawn needs the directory %s; choose another path", v)
	}
}

// inside reports whether p is strictly inside the directory dir (both clean).
func inside(p, dir string) bool {
	return len(p) > len(dir) && p[:len(dir)] == dir && (dir == "/" || p[len(dir)] == '/')
}

// cleanPath reports whether v is an absolute, clean path, adding notAbs or
// the cleaning hint when it is not.
func (c *checker) cleanPath(p jsonpath.ContextPath, v, notAbs string) bool {
	switch {
	case !path.IsAbs(v):
		c.add(p, "%s", notAbs)
	case path.Clean(v) != v:
		c.add(p, "must be a clean path (no '..', '.', '//' or trailing '/'); did you mean %q?", path.Clean(v))
	default:
		return true
	}
	return false
}

// unit checks one extra systemd unit at p.
func (c *checker) unit(p jsonpath.ContextPath, u igntypes.Unit, host bool) {
	if msg := unitNameProblem(u.Name); msg != "" {
		c.add(p.Append("name"), "%s", msg)
	}
	if host && u.Name == firstbootUnit && (u.Contents != nil || u.Mask != nil && *u.Mask) {
		c.add(p.Append("name"), "%s is nodespawn's first-boot unit, which nodespawn install writes; change it with a drop-in (dropins) instead", u.Name)
	}
	if u.Contents != nil {
		if msg := unitContentsProblem(*u.Contents); msg != "" {
			c.add(p.Append("contents"), "unit %s %s", u.Name, msg)
		}
	}
	for j, d := range u.Dropins {
		if msg := dropinNameProblem(d.Name); msg != "" {
			c.add(p.Append("dropins", j, "name"), "%s", msg)
		}
		if d.Contents != nil {
			if msg := unitContentsProblem(*d.Contents); msg != "" {
				c.add(p.Append("dropins", j, "contents"), "drop-in %s %s", d.Name, msg)
			}
		}
	}
	if u.Enabled == nil || !*u.Enabled || u.Mask != nil && *u.Mask {
		return
	}
	switch {
	case u.Contents == nil && host:
		// Enables a unit the host already has, with systemctl.
	case u.Contents == nil:
		c.add(p.Append("enabled"), "unit %s has no contents; nodespawn enables machine units from their [Install] section, so give the unit's contents or add the wants link under machine.extra.storage.links", u.Name)
	case len(InstallTargets(*u.Contents)) == 0:
		c.add(p.Append("enabled"), "unit %s has no WantedBy= or RequiredBy= in its [Install] section, so there is nothing to enable it from", u.Name)
	case isTemplate(u.Name):
		c.add(p.Append("enabled"), "unit %s is a template, which cannot be enabled by itself; name an instance (like %s) with these contents", u.Name, instanceExample(u.Name))
	}
}

// resource accepts what apply can fetch and verify: data: URLs, and http(s)
// URLs pinned by verification.hash.
func (c *checker) resource(p jsonpath.ContextPath, r igntypes.Resource) {
	compression := ""
	if r.Compression != nil {
		compression = *r.Compression
	}
	if compression != "" && compression != "gzip" {
		c.add(p.Append("compression"), `compression must be "gzip" or empty`)
	}
	if r.Source == nil || *r.Source == "" {
		return
	}
	src := *r.Source
	u, err := url.Parse(src)
	if err != nil {
		c.add(p.Append("source"), "not a valid URL")
		return
	}
	switch u.Scheme {
	case "data":
		// The error is not shown: it may quote the file's contents.
		du, err := dataurl.DecodeString(src)
		if err != nil {
			c.add(p.Append("source"), "not a valid data: URL (want data:[<mediatype>][;base64],<data>)")
		} else if compression == "gzip" {
			c.gunzip(p.Append("source"), du.Data)
		}
	case "http", "https":
		if u.Host == "" {
			c.add(p.Append("source"), "URL has no host")
		}
		if r.Verification.Hash == nil || *r.Verification.Hash == "" {
			c.add(p.Append("verification"), "an http(s) source needs verification.hash (sha256-<hex> or sha512-<hex>)")
		}
	case "":
		c.add(p.Append("source"), "must be a URL: data:, or http(s) with verification.hash")
	default:
		c.add(p.Append("source"), "unsupported source scheme %q; use a data: URL, or http(s) with verification.hash", u.Scheme)
	}
}

// gunzip checks that data decompresses (gunzip bounds one file), and
// counts what it inflates to against maxExtraInflated.
func (c *checker) gunzip(p jsonpath.ContextPath, data []byte) {
	if c.inflated > maxExtraInflated {
		return // said once
	}
	out, err := gunzip(data)
	if err != nil {
		c.add(p, "compression is gzip, but the data does not decompress (%v)", err)
		return
	}
	c.inflated += len(out)
	if c.inflated > maxExtraInflated {
		c.add(p, "the gzip contents of the extra files decompress to more than %d MiB together", maxExtraInflated>>20)
	}
}

func gunzip(data []byte) ([]byte, error) { return inflate.Gzip(data, maxInflated) }
