package userdata

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

const (
	// azureCustomData is where the Azure Linux agent stores custom data.
	azureCustomData = "/var/lib/waagent/CustomData"
	// dmiAssetTag holds azureAssetTag on every Azure VM; "auto" asks IMDS
	// only when it is there, so other clouds never wait on it.
	dmiAssetTag    = "/sys/class/dmi/id/chassis_asset_tag"
	azureAssetTag  = "7783-7084-3265-9085-8269-3286-77"
	imdsUserDataAt = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
	imdsName       = "azure-imds:userData"
)

// azure reads custom data as waagent stored it, then IMDS user data.
type azure struct {
	root    string
	imdsURL string
	client  *http.Client
	// always asks IMDS even off Azure (--source azure); "auto" does not.
	always bool
}

func newAzure(opts Options, always bool) azure {
	return azure{root: opts.Root, imdsURL: opts.IMDSBaseURL, client: opts.HTTPClient, always: always}
}

func (azure) Name() string { return "azure" }

func (a azure) Fetch(ctx context.Context) (Source, error) {
	var misses []string
	data, err := readFile(filepath.Join(a.root, azureCustomData))
	switch {
	case err == nil:
		// Depending on the agent and its settings, custom data is stored
		// base64-encoded or decoded: try both.
		if decoded, ok := decodeBase64(data); ok {
			if src, err := extractSource(azureCustomData, decoded); err == nil || !errors.Is(err, ErrNoManifest) {
				// What the user wrote is the decoded text.
				return src, err
			}
		}
		src, err := extractSource(azureCustomData, data)
		if err == nil || !errors.Is(err, ErrNoManifest) {
			return src, err
		}
		misses = append(misses, err.Error())
	case errors.Is(err, fs.ErrNotExist):
		misses = append(misses, azureCustomData+": not present")
	default:
		return Source{}, fmt.Errorf("azure: %s: %w", azureCustomData, err)
	}
	if !a.always {
		tag, _ := os.ReadFile(filepath.Join(a.root, dmiAssetTag))
		if strings.TrimSpace(string(tag)) != azureAssetTag {
			return Source{}, fmt.Errorf("azure: %w: %s; IMDS not asked: not an Azure VM (%s)", ErrNoManifest, strings.Join(misses, "; "), dmiAssetTag)
		}
	}
	src, err := a.imds(ctx)
	if err != nil {
		if errors.Is(err, ErrNoManifest) {
			return Source{}, fmt.Errorf("azure: %w: %s; %s", ErrNoManifest, strings.Join(misses, "; "), strings.TrimPrefix(err.Error(), "azure: "))
		}
		return Source{}, err
	}
	return src, nil
}

// imds fetches the VM's user data (base64) from IMDS.
func (a azure) imds(ctx context.Context) (Source, error) {
	url := strings.TrimSuffix(a.imdsURL, "/") + imdsUserDataAt
	// One minute for all of the client's attempts together: IMDS answers
	// at once when it is there, and a VM without it should not wait long.
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Source{}, fmt.Errorf("azure: IMDS request %s: %w", url, err)
	}
	req.Header.Set("Metadata", "true")
	resp, err := a.client.Do(req)
	if err != nil {
		return Source{}, fmt.Errorf("azure: IMDS user data %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := readLimited(resp.Body)
	if err != nil {
		return Source{}, fmt.Errorf("azure: IMDS user data %s: read: %w", url, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return Source{}, fmt.Errorf("azure: IMDS user data %s: %w (%s)", url, ErrNoManifest, resp.Status)
	case resp.StatusCode != http.StatusOK:
		return Source{}, fmt.Errorf("azure: IMDS user data %s: %s: %s", url, resp.Status, bytes.TrimSpace(body[:min(len(body), 200)]))
	case len(bytes.TrimSpace(body)) == 0:
		return Source{}, fmt.Errorf("azure: IMDS user data %s: %w (the VM has no user data)", url, ErrNoManifest)
	}
	decoded, ok := decodeBase64(body)
	if !ok {
		return Source{}, fmt.Errorf("azure: IMDS user data %s: not base64, as IMDS always sends it", url)
	}
	return extractSource(imdsName, decoded)
}
