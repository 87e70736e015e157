package kubecheck

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// ErrNoClientCert is wrapped by KubeletClientCert's error when the kubelet
// has no client certificate yet: it has not bootstrapped (or is still
// doing so). WaitReady's callers can treat it as "not yet".
var ErrNoClientCert = errors.New("the kubelet has not bootstrapped: no client certificate yet")

const (
	// kubeletStateDir is where the state directory is inside the machine;
	// the absolute symlinks kubelet writes start with it.
	kubeletStateDir = "/var/lib/kubelet"
	// clientCertCurrent is kubelet's current client certificate and key,
	// relative to its state directory.
	clientCertCurrent = "pki/kubelet-client-current.pem"
	// maxLinkHops bounds a chain of symlinks followed by hand.
	maxLinkHops = 8
	// maxPEMBytes bounds the certificate file read: a certificate chain
	// and a key are a few KiB.
	maxPEMBytes = 1 << 20
)

// KubeletClientCert returns the kubelet's client certificate and key as
// kubelet keeps them in its state directory: pki/kubelet-client-current.pem,
// one PEM file with the certificate and the (EC or RSA) key. stateDir is
// the host directory bound at /var/lib/kubelet in the machine.
//
// kubelet makes that file a symlink, usually with an absolute target
// inside the machine (/var/lib/kubelet/pki/kubelet-client-<time>.pem). A
// target under /var/lib/kubelet/ is read at the same place under stateDir;
// a relative target is taken from the link's directory; a target anywhere
// else in the machine is refused (it is outside what stateDir holds).
// Every path is resolved with confine, inside stateDir: a ".." or a
// symlink never leads out of it.
//
// A missing file gives an error that wraps ErrNoClientCert and
// fs.ErrNotExist and names the path.
func KubeletClientCert(stateDir string) (Credentials, error) {
	root, err := confine.Open(stateDir)
	if err != nil {
		return Credentials{}, fmt.Errorf("kubelet state directory: %w", err)
	}
	defer root.Close()
	data, file, err := readFollowing(root, clientCertCurrent)
	if err != nil {
		return Credentials{}, err
	}
	certPEM, keyPEM, err := splitPEM(data)
	if err != nil {
		return Credentials{}, fmt.Errorf("kubelet client certificate %s %w", root.Show(file), err)
	}
	creds := Credentials{CertPEM: certPEM, KeyPEM: keyPEM}
	if _, _, err := creds.keyPair(); err != nil {
		return Credentials{}, fmt.Errorf("kubelet client certificate %s: %w", root.Show(file), err)
	}
	return creds, nil
}

// readFollowing reads the regular file at p in root, following symlinks
// by hand so that absolute targets are taken as the machine sees them
// (mapped from /var/lib/kubelet onto the root). It returns the contents
// and the path, in root, of the file read.
func readFollowing(root *confine.Root, p string) ([]byte, string, error) {
	first := p
	for hop := 0; ; hop++ {
		f, err := root.OpenNoFollow(p)
		if err == nil {
			defer f.Close()
			data, err := io.ReadAll(io.LimitReader(f, maxPEMBytes+1))
			if err != nil {
				return nil, "", fmt.Errorf("read kubelet client certificate: %w", err)
			}
			if len(data) > maxPEMBytes {
				return nil, "", fmt.Errorf("kubelet client certificate %s is larger than %d bytes: not a certificate and key", root.Show(p), maxPEMBytes)
			}
			return data, p, nil
		}
		switch {
		case errors.Is(err, fs.ErrNotExist) && hop == 0:
			return nil, "", fmt.Errorf("%w: %s does not exist (%w)", ErrNoClientCert, root.Show(p), fs.ErrNotExist)
		case errors.Is(err, fs.ErrNotExist):
			return nil, "", fmt.Errorf("kubelet client certificate %s leads to %s, which does not exist: %w", root.Show(first), root.Show(p), err)
		case !errors.Is(err, unix.ELOOP):
			return nil, "", fmt.Errorf("kubelet client certificate: %w", err)
		}
		// ELOOP with O_NOFOLLOW: p is a symlink.
		if hop >= maxLinkHops {
			return nil, "", fmt.Errorf("kubelet client certificate %s: more than %d symlinks in a row", root.Show(first), maxLinkHops)
		}
		target, err := root.Readlink(p)
		if err != nil {
			return nil, "", fmt.Errorf("kubelet client certificate: %w", err)
		}
		next, ok := linkTarget(p, target)
		if !ok {
			return nil, "", fmt.Errorf("kubelet client certificate %s is a symlink to %s, outside the kubelet's state directory (%s in the machine): refusing to follow it", root.Show(p), target, kubeletStateDir)
		}
		p = next
	}
}

// linkTarget maps the target of the symlink at p (a path in the state
// directory) to a path in the state directory: an absolute target must be
// under /var/lib/kubelet/, a relative one is joined to p's directory.
// Cleaning is lexical; the result is still resolved inside the root.
func linkTarget(p, target string) (string, bool) {
	if !path.IsAbs(target) {
		return confine.Clean(path.Join(path.Dir("/"+confine.Clean(p)), target)), true
	}
	t := path.Clean(target)
	if t == kubeletStateDir {
		return "", true
	}
	if rel, ok := strings.CutPrefix(t, kubeletStateDir+"/"); ok {
		return rel, true
	}
	return "", false
}
