package download

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
)

// RecordSuffix ends the name of every install record in the cache.
const RecordSuffix = ".nodespawn-download.json"

// installRecord is what an install left behind, kept in the cache directory so a
// rerun can tell, without the network, that nothing needs doing.
type installRecord struct {
	URL         string `json:"url"`
	ChecksumURL string `json:"checksumURL,omitempty"`
	// SHA256 is the artifact's digest as bare hex, the record's format
	// since its first version, so an upgrade keeps reruns no-ops.
	SHA256  string        `json:"sha256"`
	Dest    string        `json:"dest"`
	Mode    uint32        `json:"mode"`
	Archive string        `json:"archive,omitempty"`
	Members []plan.Member `json:"members,omitempty"`
	// Files are the installed entries, relative to Dest for archives;
	// a binary has one entry with an empty path.
	Files []entry `json:"files"`
}

// RecordName is the name, in the cache directory, of the record for d.
// The key covers everything that decides what gets installed: the source
// (URL and the pinned digest or the checksum file), the destination (the
// plan's path, whatever root it is applied to), the mode and the members.
func RecordName(d plan.Download) string {
	key, _ := json.Marshal(struct {
		URL, ChecksumURL, SHA256, Dest, Archive string
		Mode                                    uint32
		Members                                 []plan.Member
	}{d.URL, d.ChecksumURL, d.SHA256, d.Dest, d.Archive, d.Mode, d.Members})
	// Half the digest tells plans apart and keeps the names records had.
	return digest.FromBytes(key).Encoded()[:32] + RecordSuffix
}

// loadRecord returns the record for d, or nil when there is none.
func (f *Fetcher) loadRecord(d plan.Download) (*installRecord, error) {
	b, err := f.Root.ReadFile(path.Join(f.CacheDir, RecordName(d)))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read download record: %w", err)
	}
	var r installRecord
	if err := json.Unmarshal(b, &r); err != nil {
		// A corrupt record only costs a download; do not fail on it.
		return nil, nil
	}
	return &r, nil
}

func (f *Fetcher) saveRecord(r *installRecord, d plan.Download) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode download record: %w", err)
	}
	// 0600: a URL may carry a token in its query.
	return f.Root.WriteFile(path.Join(f.CacheDir, RecordName(d)), append(b, '\n'), 0o600, -1, -1)
}

// intact reports whether every file the record lists is still installed
// at dest in root with the recorded contents.
func (r *installRecord) intact(root *confine.Root, dest string) bool {
	for _, e := range r.Files {
		p := path.Join("/"+dest, e.Rel)
		switch e.Kind {
		case kindFile:
			if _, ok := holds(root, p, sha256Hex(e.SHA256)); !ok {
				return false
			}
		case kindSymlink:
			t, err := root.Readlink(p)
			if err != nil || t != e.Target {
				return false
			}
		case kindDir:
			fi, err := root.Lstat(p)
			if err != nil || !fi.IsDir() {
				return false
			}
		}
	}
	return len(r.Files) > 0
}

// digest is the artifact's digest.
func (r *installRecord) digest() digest.Digest { return sha256Hex(r.SHA256) }

// sha256Hex is the digest a record holds as bare hex.
func sha256Hex(hex string) digest.Digest { return digest.NewDigestFromEncoded(digest.SHA256, hex) }

// holds reports whether the regular file at p in root (a symlink there is
// not followed) has the digest want, and its size.
func holds(root *confine.Root, p string, want digest.Digest) (int64, bool) {
	f, err := root.OpenNoFollow(p)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	v := want.Verifier()
	n, err := io.Copy(v, f)
	return n, err == nil && v.Verified()
}

// fileDigest is the sha256 digest of the regular file at p in root (a
// symlink there is not followed).
func fileDigest(root *confine.Root, p string) (digest.Digest, error) {
	f, err := root.OpenNoFollow(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return digest.SHA256.FromReader(f)
}
