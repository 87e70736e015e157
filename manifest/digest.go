package manifest

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// Digest identifies what a loaded manifest asks for: the digest of its
// canonical JSON form (every default applied, object keys sorted), so two
// manifests that differ only in comments, key order, quoting or spelt-out
// defaults have the same digest.
func (m *Manifest) Digest() (digest.Digest, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return "", fmt.Errorf("manifest digest: %w", err)
	}
	return digest.FromBytes(b), nil
}
