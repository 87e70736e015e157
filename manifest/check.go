package manifest

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/netip"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"
	"unicode"

	jsonpath "github.com/coreos/vcontext/path"
	"oras.land/oras-go/v2/registry"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// check runs the rules the schema cannot express. Messages never repeat a
// secret value.
func check(m *Manifest) []problem { return checkWith(m, checker{}) }

// checkWith runs check's rules with c's settings (config: a fleet config,
// whose kubernetes.auth may be empty: the node's identity carries over).
func checkWith(m *Manifest, c checker) []problem {
	c.machine(&m.Machine)
	c.kubernetes(&m.Kubernetes)
	c.components(&m.Components)
	c.host(&m.Host)
	c.duration(jsonpath.New("", "firstBoot", "retryFor"), m.FirstBoot.RetryFor, 0)
	c.duration(jsonpath.New("", "upgrade", "readyTimeout"), m.Upgrade.ReadyTimeout, 10*time.Second)
	c.duration(jsonpath.New("", "upgrade", "stopTimeout"), m.Upgrade.StopTimeout, time.Second)
	grace := parseDuration(m.Kubernetes.ShutdownGracePeriod)
	if m.Kubernetes.ShutdownGracePeriod == "" {
		grace = parseDuration(DefaultShutdownGracePeriod)
	}
	if stop := parseDuration(m.Upgrade.StopTimeout); stop > 0 && stop <= grace {
		c.add(jsonpath.New("", "upgrade", "stopTimeout"), "%s is not longer than kubernetes.shutdownGracePeriod (%s): the machine would be killed before kubelet has given pods their termination time", m.Upgrade.StopTimeout, grace)
	}
	c.report(m.Report)
	return c.probs
}

type checker struct {
	// config relaxes auth's "exactly one of" to "at most one of"
	// (LoadConfig).
	config bool
	probs  []problem
	// inflated counts what gzip-compressed extra files decompress to.
	inflated int
}

// add records a problem with the value at p (a copy of p: callers build
// paths with Append and go on appending).
func (c *checker) add(p jsonpath.ContextPath, format string, args ...any) {
	c.probs = append(c.probs, problem{path: p.Copy(), msg: fmt.Sprintf(format, args...)})
}

// addKey records a problem with the key of the member at p.
func (c *checker) addKey(p jsonpath.ContextPath, format string, args ...any) {
	c.probs = append(c.probs, problem{path: p.Copy(), key: true, msg: fmt.Sprintf(format, args...)})
}

func (c *checker) machine(mc *Machine) {
	p := jsonpath.New("", "machine")
	if mc.Name != "" {
		if msg := machineNameProblem(mc.Name); msg != "" {
			c.add(p.Append("name"), "%s", msg)
		} else if alt := layout.PairOf(mc.Name)[1]; machineNameProblem(alt) != "" {
			c.add(p.Append("name"), "upgrades alternate between %s and %s, and %s", mc.Name, alt, machineNameProblem(alt))
		}
	}
	c.rootfs(&mc.Rootfs)
	for i, b := range mc.Binds {
		bp := p.Append("binds", i)
		c.bindPath(bp.Append("source"), b.Source)
		if b.Target != "" {
			c.bindPath(bp.Append("target"), b.Target)
		}
	}
	for i, f := range mc.SystemCallFilter {
		if strings.ContainsFunc(f, isSpaceOrControl) {
			c.add(p.Append("systemCallFilter", i), "one system call or @group per entry, without spaces or control characters")
		}
	}
	c.dns(p.Append("dns"), mc.DNS)
	c.extra(p.Append("extra"), &mc.Extra, false)
}

func (c *checker) bindPath(p jsonpath.ContextPath, v string) {
	switch {
	case !path.IsAbs(v):
		c.add(p, "must be an absolute path")
	case strings.ContainsAny(v, ":\\") || strings.ContainsFunc(v, unicode.IsControl):
		c.add(p, "must not contain ':', '\\' or control characters like a newline (nspawn's Bind= syntax)")
	case path.Clean(v) != v:
		c.add(p, "must be a clean path (no '..', '.', '//' or trailing '/'); did you mean %q?", path.Clean(v))
	}
}

// machineNameProblem applies systemd's machine_name_is_valid: a hostname of
// at most 64 characters, dot-separated labels of ASCII letters, digits and
// '-', no label starting or ending with '-', no empty label. (systemd before
// v247 also took '_'; the rule here suits every version.)
func machineNameProblem(name string) string {
	if len(name) > 64 {
		return "machine name must be at most 64 characters"
	}
	if name == ".host" {
		return `".host" names the host itself, not a machine`
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" {
			return "machine name must not start or end with '.' or hold '..'"
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return "machine name labels must not start or end with '-'"
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Sprintf("machine name may hold only letters, digits, '-' and '.', not %q", r)
			}
		}
	}
	return ""
}

func (c *checker) rootfs(r *Rootfs) {
	p := jsonpath.New("", "machine", "rootfs")
	var sources []string
	if r.Image != "" || r.GPUImage != "" {
		sources = append(sources, "image/gpuImage")
	}
	if r.Layout != nil {
		sources = append(sources, "layout")
	}
	if r.Debootstrap != nil {
		sources = append(sources, "debootstrap")
	}
	if len(sources) > 1 {
		c.add(p, "give one rootfs source, not %s", strings.Join(sources, " and "))
	}
	if r.Debootstrap != nil && r.Store == StoreLayers {
		c.add(p.Append("store"), "debootstrap builds one flattened tree; the layer store needs an OCI image or layout (or set store to flat or auto)")
	}
	if r.Image != "" {
		c.imageRef(p.Append("image"), r.Image)
	}
	if r.GPUImage != "" {
		c.imageRef(p.Append("gpuImage"), r.GPUImage)
	}
	if l := r.Layout; l != nil {
		if !path.IsAbs(l.Path) {
			c.add(p.Append("layout", "path"), "must be an absolute path")
		}
		if l.Reference != "" && strings.ContainsAny(l.Reference, " \t\n/") {
			c.add(p.Append("layout", "reference"), "must be a tag or a digest")
		}
	}
	if d := r.Debootstrap; d != nil && d.Mirror != "" {
		c.httpURL(p.Append("debootstrap", "mirror"), d.Mirror, "")
	}
	for i, h := range r.PlainHTTP {
		if msg := hostPortProblem(h); msg != "" {
			c.add(p.Append("plainHTTP", i), "%s", msg)
		}
	}
	// A bound under a few MiB fits no image: a typo ("20" for "20Gi").
	c.size(p.Append("maxUnpackedSize"), r.MaxUnpackedSize, 1<<20)
	c.size(p.Append("minFreeSpace"), r.MinFreeSpace, 0)
}

// imageRef accepts registry/repository with a tag or a digest.
func (c *checker) imageRef(p jsonpath.ContextPath, ref string) {
	r, err := registry.ParseReference(ref)
	if err != nil {
		c.add(p, "not a valid image reference (want registry/repository:tag or registry/repository@sha256:...)")
		return
	}
	if r.Reference == "" {
		c.add(p, "pin the image with a tag or a digest (registry/repository:tag)")
	}
}

func hostPortProblem(h string) string {
	u, err := url.Parse("//" + h)
	if err != nil || u.Host != h || u.Hostname() == "" {
		return "must be a registry host or host:port, without scheme or path"
	}
	if port := u.Port(); port != "" {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return "port must be 1-65535"
		}
	}
	return ""
}

// httpURL checks an absolute http(s) URL with a host; httpsOnly, when
// set, says why only https will do.
func (c *checker) httpURL(p jsonpath.ContextPath, v string, httpsOnly string) {
	u, err := url.Parse(v)
	want := "http or https"
	if httpsOnly != "" {
		want = "https"
	}
	switch {
	case err != nil || !u.IsAbs() || u.Host == "":
		c.add(p, "must be an absolute %s URL", want)
	case httpsOnly != "" && u.Scheme != "https":
		c.add(p, "must be an https URL (%s)", httpsOnly)
	case u.Scheme != "http" && u.Scheme != "https":
		c.add(p, "must be an http or https URL, not %s", u.Scheme)
	case u.User != nil:
		c.add(p, "must not carry credentials")
	}
}

// baseURL checks a mirror base URL: the upstream path is appended to it,
// so a query or fragment would end up in the middle of every URL.
func (c *checker) baseURL(p jsonpath.ContextPath, v string) {
	before := len(c.probs)
	c.httpURL(p, v, "")
	if len(c.probs) > before {
		return
	}
	if u, _ := url.Parse(v); u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		c.add(p, "a mirror base URL has no query or fragment (the upstream path is appended to it)")
	}
}

var (
	bootstrapTokenRE = lazyre.New(`^[a-z0-9]{6}\.[a-z0-9]{16}$`)
	sha256RE         = lazyre.New(`^[0-9a-f]{64}$`)
	// Kubernetes' qualified-name and label-value syntax.
	nameRE       = lazyre.New(`^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`)
	dns1123Label = lazyre.New(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
)

func (c *checker) kubernetes(k *Kubernetes) {
	p := jsonpath.New("", "kubernetes")
	if k.Version != "" {
		if msg := semverProblem(k.Version); msg != "" {
			c.add(p.Append("version"), "%s", msg)
		}
	}
	c.httpURL(p.Append("apiServer"), k.APIServer, "kubelet verifies the API server with caCert")
	if msg := caProblem(k.CACert); msg != "" {
		c.add(p.Append("caCert"), "%s", msg)
	}
	for i, ip := range k.ClusterDNS {
		if a, err := netip.ParseAddr(ip); err != nil {
			c.add(p.Append("clusterDNS", i), "must be an IP address")
		} else if a.Zone() != "" {
			c.add(p.Append("clusterDNS", i), "must be an IP address without a zone (%%%s): kubelet parses none", a.Zone())
		}
	}
	if k.ClusterDomain != "" && !isDNS1123Subdomain(k.ClusterDomain) {
		c.add(p.Append("clusterDomain"), "must be a DNS domain (lowercase letters, digits, '-' and '.')")
	}
	c.nodeIP(p.Append("nodeIP"), k)
	c.duration(p.Append("shutdownGracePeriod"), k.ShutdownGracePeriod, 0)
	if k.NodeName != "" && !isDNS1123Subdomain(k.NodeName) {
		c.add(p.Append("nodeName"), "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit")
	}
	for key, val := range k.Labels {
		lp := p.Append("labels", key)
		if msg := qualifiedNameProblem(key); msg != "" {
			c.addKey(lp, "label key %s", msg)
		} else if msg := kubeletLabelProblem(key); msg != "" {
			c.addKey(lp, "%s", msg)
		}
		if msg := labelValueProblem(val); msg != "" {
			c.add(lp, "label value %s", msg)
		}
	}
	for i, t := range k.Taints {
		tp := p.Append("taints", i)
		if msg := qualifiedNameProblem(t.Key); msg != "" {
			c.add(tp.Append("key"), "taint key %s", msg)
		}
		if msg := labelValueProblem(t.Value); msg != "" {
			c.add(tp.Append("value"), "taint value %s", msg)
		}
	}
	c.auth(&k.Auth)
	for i, a := range k.KubeletArgs {
		if msg := kubeletArgProblem(a); msg != "" {
			c.add(p.Append("kubeletArgs", i), "%s", msg)
		}
	}
	if k.SandboxImage != "" {
		c.imageRef(p.Append("sandboxImage"), k.SandboxImage)
	}
}

// kubeletArgProblem: the flags travel in one quoted Environment= value of
// a systemd drop-in, which systemd splits at whitespace; a space would cut
// a flag in two, a quote or backslash would end or escape the value, and
// a control character (a NUL ends a unit file line) has no place in a
// flag. The value as a whole must stay within MaxExecString, which render
// checks; one flag alone is refused here.
func kubeletArgProblem(a string) string {
	switch {
	case !strings.HasPrefix(a, "--") || len(a) < 3:
		return "must be a flag like --max-pods=200"
	case strings.ContainsFunc(a, isSpaceOrControl):
		return "one flag per entry, without spaces, tabs, newlines or other control characters (like --max-pods=200)"
	case strings.ContainsAny(a, "\"'\\"):
		return "must not contain quotes or backslashes: the flags are passed unquoted, so write the value as kubelet should see it"
	case len(a) > MaxExecString:
		return fmt.Sprintf("is %d bytes; the kubelet flags reach kubelet in one environment variable, and Linux starts no program with one over %d bytes (MAX_ARG_STRLEN)", len(a), MaxExecString)
	}
	return ""
}

func isSpaceOrControl(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }

func (c *checker) auth(a *Auth) {
	p := jsonpath.New("", "kubernetes", "auth")
	switch {
	case a.BootstrapToken != "" && a.Exec != nil:
		c.add(p, "give bootstrapToken or exec, not both")
	case a.BootstrapToken == "" && a.Exec == nil && !c.config:
		c.add(p, "give bootstrapToken or exec")
	}
	if a.BootstrapToken != "" && !bootstrapTokenRE().MatchString(a.BootstrapToken) {
		// Never echo the token: say what shape it must have.
		c.add(p.Append("bootstrapToken"), "not a bootstrap token: want 6 lowercase letters or digits, '.', then 16 more ([a-z0-9]{6}.[a-z0-9]{16})")
	}
	if e := a.Exec; e != nil {
		seen := map[string]bool{}
		for i, env := range e.Env {
			if strings.ContainsAny(env.Name, "=\x00") {
				c.add(p.Append("exec", "env", i, "name"), "must not contain '=' or NUL")
			}
			if seen[env.Name] {
				c.add(p.Append("exec", "env", i, "name"), "duplicate variable %q", env.Name)
			}
			seen[env.Name] = true
		}
	}
}

// semverProblem accepts major.minor.patch with optional pre-release and
// build, and a leading "v".
func semverProblem(v string) string {
	if _, ok := strictSemver(v); !ok {
		return "not a semantic version (want like v1.37.2)"
	}
	return ""
}

// Certificates parses the CERTIFICATE blocks of a PEM bundle (a
// manifest's caCert), in order; other blocks are skipped.
func Certificates(s string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := []byte(s)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return out, nil
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d does not parse: %v", len(out)+1, err)
		}
		out = append(out, c)
	}
}

func caProblem(s string) string {
	certs, err := Certificates(s)
	switch {
	case err != nil:
		return err.Error()
	case len(certs) == 0:
		return "must be PEM with at least one CERTIFICATE block"
	}
	return ""
}

func isDNS1123Subdomain(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if len(l) > 63 || !dns1123Label().MatchString(l) {
			return false
		}
	}
	return true
}

// qualifiedNameProblem applies Kubernetes' qualified name rule: an optional
// DNS subdomain prefix and '/', then a name of at most 63 characters.
func qualifiedNameProblem(key string) string {
	name := key
	if i := strings.IndexByte(key, '/'); i >= 0 {
		prefix := key[:i]
		name = key[i+1:]
		if prefix == "" || !isDNS1123Subdomain(prefix) {
			return fmt.Sprintf("%q: prefix must be a DNS subdomain (lowercase letters, digits, '-', '.')", key)
		}
	}
	switch {
	case name == "":
		return fmt.Sprintf("%q: name part must not be empty", key)
	case len(name) > 63:
		return fmt.Sprintf("%q: name part must be at most 63 characters", key)
	case !nameRE().MatchString(name):
		return fmt.Sprintf("%q: name part may hold letters, digits, '-', '_' and '.', and must start and end with a letter or digit", key)
	}
	return ""
}

func labelValueProblem(v string) string {
	switch {
	case v == "":
		return ""
	case len(v) > 63:
		return "must be at most 63 characters"
	case !nameRE().MatchString(v):
		return "may hold letters, digits, '-', '_' and '.', and must start and end with a letter or digit"
	}
	return ""
}

// kubeletLabels are the kubernetes.io labels kubelet sets on itself.
var kubeletLabels = map[string]bool{
	"kubernetes.io/hostname":                   true,
	"kubernetes.io/os":                         true,
	"kubernetes.io/arch":                       true,
	"beta.kubernetes.io/os":                    true,
	"beta.kubernetes.io/arch":                  true,
	"beta.kubernetes.io/instance-type":         true,
	"node.kubernetes.io/instance-type":         true,
	"topology.kubernetes.io/region":            true,
	"topology.kubernetes.io/zone":              true,
	"failure-domain.beta.kubernetes.io/region": true,
	"failure-domain.beta.kubernetes.io/zone":   true,
}

// kubeletLabelProblem mirrors kubelet's own check (it refuses to start with
// other labels in the kubernetes.io and k8s.io namespaces): allowed are the
// labels above and the kubelet.kubernetes.io and node.kubernetes.io
// namespaces with their subdomains.
func kubeletLabelProblem(key string) string {
	i := strings.IndexByte(key, '/')
	if i < 0 || kubeletLabels[key] {
		return ""
	}
	ns := key[:i]
	inNS := func(d string) bool { return ns == d || strings.HasSuffix(ns, "."+d) }
	if !inNS("kubernetes.io") && !inNS("k8s.io") {
		return ""
	}
	if inNS("kubelet.kubernetes.io") || inNS("node.kubernetes.io") {
		return ""
	}
	msg := fmt.Sprintf("kubelet refuses to set label %q on its node (the %s namespace is reserved)", key, ns)
	if ns == "node-role.kubernetes.io" {
		msg += "; set node roles from the control plane, or use a node.kubernetes.io/ label"
	}
	return msg
}

func (c *checker) components(cs *Components) {
	p := jsonpath.New("", "components")
	if cs.Mirror != "" {
		c.baseURL(p.Append("mirror"), cs.Mirror)
	}
	for _, e := range []struct {
		name string
		c    *Component
	}{
		{"containerd", &cs.Containerd},
		{"runc", &cs.Runc},
		{"cniPlugins", &cs.CNIPlugins},
		{"kubelet", &cs.Kubelet},
		{"kubectl", &cs.Kubectl},
		{"kubeProxy", &cs.KubeProxy},
		{"crictl", &cs.Crictl},
	} {
		cp := p.Append(e.name)
		if e.c.Version != "" {
			if msg := semverProblem(e.c.Version); msg != "" {
				c.add(cp.Append("version"), "%s", msg)
			} else if e.name == "containerd" {
				c.containerdVersion(cp.Append("version"), e.c.Version)
			}
		}
		if e.c.URL != "" {
			c.httpURL(cp.Append("url"), e.c.URL, "")
		}
		if e.c.BaseURL != "" {
			c.baseURL(cp.Append("baseURL"), e.c.BaseURL)
		}
		if e.c.SHA256 != "" && !sha256RE().MatchString(e.c.SHA256) {
			c.add(cp.Append("sha256"), "must be 64 lowercase hex digits")
		}
	}
}

var (
	sysctlNameRE = lazyre.New(`^[a-zA-Z0-9_-]+([./][a-zA-Z0-9_:@-]+)+$`)
	moduleRE     = lazyre.New(`^[a-zA-Z0-9_-]+$`)
)

func (c *checker) host(h *Host) {
	p := jsonpath.New("", "host")
	for name, v := range h.Sysctls {
		sp := p.Append("sysctls", name)
		if !sysctlNameRE().MatchString(name) {
			c.addKey(sp, "not a sysctl name (like net.ipv4.ip_forward)")
		}
		// Tabs separate the fields of values like net.ipv4.tcp_rmem; no
		// other control character belongs in a sysctl.d line.
		if v == "" || strings.ContainsFunc(string(v), func(r rune) bool { return r != '\t' && unicode.IsControl(r) }) {
			c.add(sp, "sysctl value must be one line, not empty, without control characters")
		}
	}
	for i, mod := range h.Modules {
		if !moduleRE().MatchString(mod) {
			c.add(p.Append("modules", i), "not a kernel module name")
		}
	}
	c.extra(p.Append("extra"), &h.Extra, true)
}
