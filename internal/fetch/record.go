package fetch

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nodespawn/nodespawn/internal/fsutil"
	"github.com/nodespawn/nodespawn/render"
)

// record is what an install left behind, kept in the cache directory so a
// rerun can tell, without the network, that nothing needs doing.
type record struct {
	URL         string          `json:"url"`
	ChecksumURL string          `json:"checksumURL,omitempty"`
	SHA256      string          `json:"sha256"`
	Dest        string          `json:"dest"`
	Mode        uint32          `json:"mode"`
	Archive     string          `json:"archive,omitempty"`
	Members     []render.Member `json:"members,omitempty"`
	// Files are the installed entries, relative to Dest for archives;
	// a binary has one entry with an empty path.
	Files []entry `json:"files"`
}

// recordPath is where the record for d lives. The key covers everything
// that decides what gets installed: the source (URL and the pinned digest
// or the checksum file), the destination, the mode and the members.
func recordPath(cacheDir string, d render.Download) string {
	key, _ := json.Marshal(struct {
		URL, ChecksumURL, SHA256, Dest, Archive string
		Mode                                    uint32
		Members                                 []render.Member
	}{d.URL, d.ChecksumURL, d.SHA256, d.Dest, d.Archive, d.Mode, d.Members})
	sum := sha256.Sum256(key)
	return filepath.Join(cacheDir, hex.EncodeToString(sum[:16])+".nodespawn-download.json")
}

// loadRecord returns the record for d, or nil when there is none.
func loadRecord(cacheDir string, d render.Download) (*record, error) {
	b, err := os.ReadFile(recordPath(cacheDir, d))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read download record: %w", err)
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		// A corrupt record only costs a download; do not fail on it.
		return nil, nil
	}
	return &r, nil
}

func saveRecord(cacheDir string, r *record, d render.Download) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode download record: %w", err)
	}
	// 0600: a URL may carry a token in its query.
	return fsutil.WriteFile(recordPath(cacheDir, d), append(b, '\n'), 0o600, -1, -1)
}

// intact reports whether every file the record lists is still installed
// with the recorded contents.
func (r *record) intact() bool {
	for _, e := range r.Files {
		p := filepath.Join(r.Dest, e.Rel)
		switch e.Kind {
		case kindFile:
			sum, err := fileSHA256(p)
			if err != nil || sum != e.SHA256 {
				return false
			}
		case kindSymlink:
			t, err := os.Readlink(p)
			if err != nil || t != e.Target {
				return false
			}
		case kindDir:
			fi, err := os.Lstat(p)
			if err != nil || !fi.IsDir() {
				return false
			}
		}
	}
	return len(r.Files) > 0
}

// fileSHA256 hashes a regular file without following a final symlink.
func fileSHA256(p string) (string, error) {
	fi, err := os.Lstat(p)
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", p)
	}
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
