// Package testregistry runs an OCI registry on 127.0.0.1 for tests
// (go-containerregistry's registry, blobs on disk) and records every
// request it serves, so tests can show who fetched what.
package testregistry

import (
	"io"
	stdlog "log"
	"net"
	"net/http"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/registry"
)

// Request is one request the registry served.
type Request struct {
	Method    string
	Path      string
	UserAgent string
}

// Registry is a running registry.
type Registry struct {
	// Host is host:port to use in references.
	Host string
	srv  *http.Server
	mu   sync.Mutex
	log  []Request
}

// Start serves a registry on a free 127.0.0.1 port, keeping blobs under
// blobDir (in memory if empty).
func Start(blobDir string) (*Registry, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	var opts []registry.Option
	if blobDir != "" {
		opts = append(opts, registry.WithBlobHandler(registry.NewDiskBlobHandler(blobDir)))
	}
	opts = append(opts, registry.Logger(nullLogger()))
	h := registry.New(opts...)
	r := &Registry{Host: ln.Addr().String()}
	r.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.log = append(r.log, Request{Method: req.Method, Path: req.URL.Path, UserAgent: req.UserAgent()})
		r.mu.Unlock()
		h.ServeHTTP(w, req)
	})}
	go r.srv.Serve(ln) //nolint:errcheck // ends with Close
	return r, nil
}

// Close stops the registry.
func (r *Registry) Close() error { return r.srv.Close() }

// Requests returns what was served so far.
func (r *Registry) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.log...)
}

// BlobFetches returns the GET requests for blobs whose user agent
// contains agent.
func (r *Registry) BlobFetches(agent string) []Request {
	var out []Request
	for _, q := range r.Requests() {
		if q.Method == http.MethodGet && strings.Contains(q.Path, "/blobs/") && strings.Contains(q.UserAgent, agent) {
			out = append(out, q)
		}
	}
	return out
}

// Reset forgets the requests served so far.
func (r *Registry) Reset() {
	r.mu.Lock()
	r.log = nil
	r.mu.Unlock()
}

func nullLogger() *stdlog.Logger { return stdlog.New(io.Discard, "", 0) }
