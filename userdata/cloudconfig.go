package userdata

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"

	"go.yaml.in/yaml/v3"
)

// extractCloudConfig takes the manifest from the write_files entry for
// WellKnownManifestPath in #cloud-config user-data.
func extractCloudConfig(name string, data []byte) (string, []byte, error) {
	var cc struct {
		WriteFiles []struct {
			Path     string `yaml:"path"`
			Content  string `yaml:"content"`
			Encoding string `yaml:"encoding"`
			Source   any    `yaml:"source"`
		} `yaml:"write_files"`
	}
	if err := yaml.Unmarshal(data, &cc); err != nil {
		return "", nil, fmt.Errorf("%s: #cloud-config is not valid YAML: %w", name, err)
	}
	for i, wf := range cc.WriteFiles {
		if filepath.Clean(wf.Path) != WellKnownManifestPath {
			continue
		}
		where := fmt.Sprintf("%s#write_files[%d]", name, i)
		if wf.Source != nil && wf.Content == "" {
			return "", nil, fmt.Errorf("%s: write_files source: URLs are not fetched at this stage; put the manifest in content", where)
		}
		content, err := decodeWriteFile(wf.Content, wf.Encoding)
		if err != nil {
			return "", nil, fmt.Errorf("%s: %w", where, err)
		}
		if len(bytes.TrimSpace(content)) == 0 {
			return "", nil, fmt.Errorf("%s: %w (content is empty)", where, ErrNoManifest)
		}
		return where, content, nil
	}
	return "", nil, fmt.Errorf("%s: %w (#cloud-config without a write_files entry for %s)", name, ErrNoManifest, WellKnownManifestPath)
}

// decodeWriteFile undoes cloud-init's write_files encodings.
func decodeWriteFile(content, encoding string) ([]byte, error) {
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "text/plain":
		return []byte(content), nil
	case "b64", "base64":
		b, ok := decodeBase64([]byte(content))
		if !ok {
			return nil, fmt.Errorf("encoding %s: content is not valid base64", encoding)
		}
		return b, nil
	case "gz", "gzip":
		return gunzip([]byte(content))
	case "gz+base64", "gzip+base64", "gz+b64", "gzip+b64":
		b, ok := decodeBase64([]byte(content))
		if !ok {
			return nil, fmt.Errorf("encoding %s: content is not valid base64", encoding)
		}
		return gunzip(b)
	}
	return nil, fmt.Errorf("encoding %q not supported (use plain, b64 or gz+b64)", encoding)
}
