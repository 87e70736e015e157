package imagebuild

import (
	"fmt"

	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content/oci"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/credentials"

	"github.com/nodespawn/nodespawn/internal/httpx"
)

// Layout opens (creating when needed) an OCI image layout directory.
func Layout(dir string) (oras.Target, error) {
	s, err := oci.New(dir)
	if err != nil {
		return nil, fmt.Errorf("open OCI layout %s: %w", dir, err)
	}
	return s, nil
}

// Repository returns the registry repository named by ref
// ("host[:port]/name:tag") and the tag. plainHTTP reaches that one registry
// without TLS; otherwise TLS is always verified. Credentials come from the
// Docker config (~/.docker/config.json, as docker login and oras login write it).
// Requests go through the project's one client (httpx), so a push retries,
// verifies TLS and times out like every other request nodespawn makes.
func Repository(ref string, plainHTTP bool) (oras.Target, string, error) {
	repo, err := remote.NewRepository(ref)
	if err != nil {
		return nil, "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	tag := repo.Reference.Reference
	if tag == "" {
		return nil, "", fmt.Errorf("image reference %q: needs a tag to push to, e.g. %s:latest", ref, ref)
	}
	if _, err := repo.Reference.Digest(); err == nil {
		return nil, "", fmt.Errorf("image reference %q: a digest cannot be pushed to; name a tag", ref)
	}
	repo.PlainHTTP = plainHTTP
	store, err := credentials.NewStoreFromDocker(credentials.StoreOptions{})
	if err != nil {
		return nil, "", fmt.Errorf("read registry credentials from the Docker config: %w", err)
	}
	repo.Client = &auth.Client{Client: httpx.NewClient(), Cache: auth.NewCache(), Credential: credentials.Credential(store)}
	return repo, tag, nil
}
