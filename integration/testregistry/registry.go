// Package testregistry runs an OCI registry on 127.0.0.1 for tests
// (go-containerregistry's registry, blobs on disk) and records every
// request it serves, so tests can show who fetched what.
package testregistry

import (
	"io"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/registry"
)

// Request is one request the registry served.
type Request struct {
	Method    string
	Path      string
	UserAgent string
	// Host is the listener (host:port) the request came in on.
	Host string
}

// Registry is a running registry.
type Registry struct {
	// Host is host:port to use in references.
	Host    string
	handler http.Handler
	opts    Options
	mu      sync.Mutex
	log     []Request
	srvs    []*http.Server
	blobs   map[string][]byte // digest -> bytes served instead
	holds   map[string]*Hold  // digest -> a GET that stops halfway
	stalled chan struct{}     // while set, requests wait for it to close
}

// Stall makes the registry stop answering: every request from now on
// waits, its connection open, until release (safe to call again).
func (r *Registry) Stall() (release func()) {
	c := make(chan struct{})
	r.mu.Lock()
	r.stalled = c
	r.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			r.mu.Lock()
			if r.stalled == c {
				r.stalled = nil
			}
			r.mu.Unlock()
			close(c)
		})
	}
}

// Options configure StartWith.
type Options struct {
	// BlobDir keeps blobs on disk (in memory if empty).
	BlobDir string
	// User and Password, when User is set, make every request need
	// HTTP basic authentication with them.
	User, Password string
	// Referrers serves the referrers API (OCI distribution 1.1); without
	// it, clients fall back to the referrers tag schema.
	Referrers bool
}

// Start serves a registry on a free 127.0.0.1 port, keeping blobs under
// blobDir (in memory if empty).
func Start(blobDir string) (*Registry, error) {
	return StartWith(Options{BlobDir: blobDir})
}

// StartWith serves a registry on a free 127.0.0.1 port.
func StartWith(o Options) (*Registry, error) {
	var opts []registry.Option
	if o.BlobDir != "" {
		if err := os.MkdirAll(o.BlobDir, 0o755); err != nil {
			return nil, err
		}
		opts = append(opts, registry.WithBlobHandler(registry.NewDiskBlobHandler(o.BlobDir)))
	}
	opts = append(opts, registry.Logger(nullLogger()))
	if o.Referrers {
		opts = append(opts, registry.WithReferrersSupport(true))
	}
	r := &Registry{handler: registry.New(opts...), opts: o}
	host, err := r.Listen("127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r.Host = host
	return r, nil
}

// Listen serves the same registry on another address too (host:port, port
// 0 for a free one) and returns the host:port it listens on.
func (r *Registry) Listen(addr string) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	host := ln.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.serve(host, w, req)
	})}
	r.mu.Lock()
	r.srvs = append(r.srvs, srv)
	r.mu.Unlock()
	go srv.Serve(ln) //nolint:errcheck // ends with Close
	return host, nil
}

func (r *Registry) serve(host string, w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.log = append(r.log, Request{Method: req.Method, Path: req.URL.Path, UserAgent: req.UserAgent(), Host: host})
	stalled := r.stalled
	r.mu.Unlock()
	if stalled != nil {
		select {
		case <-stalled:
		case <-req.Context().Done():
			return
		}
	}
	if r.opts.User != "" {
		user, pass, ok := req.BasicAuth()
		if !ok || user != r.opts.User || pass != r.opts.Password {
			w.Header().Set("WWW-Authenticate", `Basic realm="testregistry"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
	}
	if req.Method == http.MethodGet {
		if i := strings.LastIndex(req.URL.Path, "/blobs/"); i >= 0 {
			r.mu.Lock()
			h := r.holds[req.URL.Path[i+len("/blobs/"):]]
			delete(r.holds, req.URL.Path[i+len("/blobs/"):])
			r.mu.Unlock()
			if h != nil {
				w = &holdingWriter{ResponseWriter: w, hold: h}
			}
		}
	}
	if req.Method == http.MethodGet || req.Method == http.MethodHead {
		if i := strings.LastIndex(req.URL.Path, "/blobs/"); i >= 0 {
			r.mu.Lock()
			data, ok := r.blobs[req.URL.Path[i+len("/blobs/"):]]
			r.mu.Unlock()
			if ok {
				w.Header().Set("Content-Length", strconv.Itoa(len(data)))
				w.Header().Set("Docker-Content-Digest", req.URL.Path[i+len("/blobs/"):])
				w.WriteHeader(http.StatusOK)
				if req.Method == http.MethodGet {
					w.Write(data) //nolint:errcheck // the client sees a short body
				}
				return
			}
		}
	}
	r.handler.ServeHTTP(w, req)
}

// ServeBlob makes the registry answer requests for the blob with digest
// (in any repository) with data instead of what was pushed, as a broken
// or malicious registry would.
func (r *Registry) ServeBlob(digest string, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.blobs == nil {
		r.blobs = map[string][]byte{}
	}
	r.blobs[digest] = data
}

// Hold is a blob download stopped halfway: the registry has sent the
// first half of the blob and waits to send the rest.
type Hold struct {
	// Reached is closed once the first half is sent.
	Reached chan struct{}
	release chan struct{}
	once    sync.Once
}

// Release lets the download go on (again safe to call).
func (h *Hold) Release() { h.once.Do(func() { close(h.release) }) }

// HoldBlob makes the next GET of the blob with digest (in any
// repository) stop after the first half of the blob (or of the range
// asked for) until the hold is released, so that a test can act while a client is fetching it.
func (r *Registry) HoldBlob(digest string) *Hold {
	h := &Hold{Reached: make(chan struct{}), release: make(chan struct{})}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.holds == nil {
		r.holds = map[string]*Hold{}
	}
	r.holds[digest] = h
	return h
}

// holdingWriter sends the first half of a response, flushes it, and
// waits for the hold's release before it sends the rest.
type holdingWriter struct {
	http.ResponseWriter
	hold *Hold
	half int64 // where the hold falls; 0 (nothing held) unless a 200 or 206 tells the length
	sent int64
	done bool
}

func (w *holdingWriter) WriteHeader(code int) {
	if n, err := strconv.ParseInt(w.Header().Get("Content-Length"), 10, 64); err == nil && (code == http.StatusOK || code == http.StatusPartialContent) {
		w.half = n / 2
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *holdingWriter) Write(p []byte) (int, error) {
	if w.done || w.half <= 0 || w.sent+int64(len(p)) < w.half {
		w.sent += int64(len(p))
		return w.ResponseWriter.Write(p)
	}
	k := w.half - w.sent
	n, err := w.ResponseWriter.Write(p[:k])
	w.sent += int64(n)
	if err != nil {
		return n, err
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
	w.done = true
	close(w.hold.Reached)
	<-w.hold.release
	m, err := w.ResponseWriter.Write(p[k:])
	w.sent += int64(m)
	return n + m, err
}

// Close stops the registry.
func (r *Registry) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var first error
	for _, s := range r.srvs {
		if err := s.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Requests returns what was served so far.
func (r *Registry) Requests() []Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Request(nil), r.log...)
}

func nullLogger() *stdlog.Logger { return stdlog.New(io.Discard, "", 0) }
