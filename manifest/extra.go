package manifest

import (
	"fmt"
	"net/url"
	"path"

	igntypes "github.com/coreos/ignition/v2/config/v3_5/types"
	ignvalidate "github.com/coreos/ignition/v2/config/validate"
	"github.com/coreos/vcontext/report"
	"github.com/vincent-petithory/dataurl"
)

// extra checks the Ignition-form files, directories, links and units at p:
// what nodespawn supports, then Ignition's own validation.
func (c *checker) extra(p string, x *Extra) {
	before := len(c.probs)
	for i, d := range x.Storage.Directories {
		c.nodePath(index(p+".storage.directories", i)+".path", d.Path)
	}
	for i, f := range x.Storage.Files {
		fp := index(p+".storage.files", i)
		c.nodePath(fp+".path", f.Path)
		if len(f.Append) > 0 {
			c.add(fp+".append", "append is not supported; put the whole file in contents")
		}
		c.resource(fp+".contents", f.Contents)
	}
	for i, l := range x.Storage.Links {
		lp := index(p+".storage.links", i)
		c.nodePath(lp+".path", l.Path)
		if l.Target == nil || *l.Target == "" {
			c.add(lp+".target", "a link needs a target")
		}
	}
	ours := map[string]bool{}
	for _, pr := range c.probs[before:] {
		ours[pr.path] = true
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
		ep := p
		for _, el := range e.Context.Path {
			switch v := el.(type) {
			case int:
				ep = index(ep, v)
			default:
				ep = child(ep, fmt.Sprint(v))
			}
		}
		if ours[ep] {
			continue // already said, in nodespawn's words
		}
		c.add(ep, "%s", e.Message)
	}
}

func (c *checker) nodePath(p, v string) {
	switch {
	case !path.IsAbs(v):
		c.add(p, "must be an absolute path")
	case path.Clean(v) != v:
		c.add(p, "must be a clean path (no '..', '.', '//' or trailing '/'); did you mean %q?", path.Clean(v))
	}
}

// resource accepts what apply can fetch and verify: data: URLs, and http(s)
// URLs pinned by verification.hash.
func (c *checker) resource(p string, r igntypes.Resource) {
	if r.Compression != nil && *r.Compression != "" && *r.Compression != "gzip" {
		c.add(p+".compression", `compression must be "gzip" or empty`)
	}
	if r.Source == nil || *r.Source == "" {
		return
	}
	src := *r.Source
	u, err := url.Parse(src)
	if err != nil {
		c.add(p+".source", "not a valid URL")
		return
	}
	switch u.Scheme {
	case "data":
		// The error is not shown: it may quote the file's contents.
		if _, err := dataurl.DecodeString(src); err != nil {
			c.add(p+".source", "not a valid data: URL (want data:[<mediatype>][;base64],<data>)")
		}
	case "http", "https":
		if u.Host == "" {
			c.add(p+".source", "URL has no host")
		}
		if r.Verification.Hash == nil || *r.Verification.Hash == "" {
			c.add(p+".verification", "an http(s) source needs verification.hash (sha256-<hex> or sha512-<hex>)")
		}
	case "":
		c.add(p+".source", "must be a URL: data:, or http(s) with verification.hash")
	default:
		c.add(p+".source", "unsupported source scheme %q; use a data: URL, or http(s) with verification.hash", u.Scheme)
	}
}
