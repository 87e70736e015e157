package oci

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// proxy is a loopback reverse proxy in front of the registry that records
// every request and can answer some of them itself to inject faults.
type proxy struct {
	addr string

	mu       sync.Mutex
	requests []string
	seen     map[string]int
	// fault, when set, sees each request with how often its path was seen
	// (1 the first time) and returns true when it answered it itself.
	fault func(w http.ResponseWriter, r *http.Request, n int) bool
}

func startProxy(t testing.TB, upstream string) *proxy {
	t.Helper()
	u, err := url.Parse("http://" + upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	p := &proxy{seen: map[string]int{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.requests = append(p.requests, r.Method+" "+r.URL.Path)
		p.seen[r.URL.Path]++
		n, fault := p.seen[r.URL.Path], p.fault
		p.mu.Unlock()
		if fault != nil && fault(w, r, n) {
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	p.addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

func (p *proxy) log() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.requests...)
}

func (p *proxy) setFault(f func(w http.ResponseWriter, r *http.Request, n int) bool) {
	p.mu.Lock()
	p.fault = f
	p.mu.Unlock()
}
