package image

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// fromRegistry resolves a reference against its registry, with the
// credentials of the user's docker config.json (auths, credsStore,
// credHelpers).
func fromRegistry(ctx context.Context, ref string, want ocispec.Platform, opts Options) (*Image, error) {
	desc, t, err := getFirst(ctx, ref, opts)
	if err != nil {
		return nil, err
	}
	unchecked := uncheckedBlobs(t)
	var img *Image
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, err
		}
		v1img, plat, err := selectPlatform(idx, want)
		if err != nil {
			return nil, err
		}
		img, err = describe(v1img, plat, want, openCompressed, unchecked)
		if err != nil {
			return nil, err
		}
	} else {
		v1img, err := desc.Image()
		if err != nil {
			return nil, err
		}
		img, err = describe(v1img, ocispec.Platform{}, want, openCompressed, unchecked)
		if err != nil {
			return nil, err
		}
	}
	img.Remote = true
	return img, nil
}

// uncheckedBlobs opens layer blobs with plain GETs to the endpoint t
// that served the manifest, which go-containerregistry's layers also
// read from, but without its digest check. A layer that names URLs of
// its own (a foreign layer) is read through go-containerregistry, which
// tries those first.
func uncheckedBlobs(t Target) uncheckedOpener {
	var mu sync.Mutex
	var client *http.Client
	return func(ctx context.Context, img v1.Image, d v1.Descriptor, diffID v1.Hash) (io.ReadCloser, error) {
		if len(d.URLs) > 0 {
			return openCompressed(img, d, diffID)
		}
		// One client (one token) for all of the image's blobs; one that
		// could not be made is tried again by the next blob.
		mu.Lock()
		if client == nil {
			c, err := t.Client(ctx, transport.PullScope)
			if err != nil {
				mu.Unlock()
				return nil, err
			}
			client = c
		}
		c := client
		mu.Unlock()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, BlobsURL(t.Ref.Context())+d.Digest.String(), nil)
		if err != nil {
			return nil, err
		}
		resp, err := c.Do(req)
		if err != nil {
			return nil, err
		}
		if err := transport.CheckError(resp, http.StatusOK); err != nil {
			resp.Body.Close()
			return nil, err
		}
		return resp.Body, nil
	}
}

// BlobsURL is where repo's blobs are, for requests go-containerregistry
// does not make; Target.Client switches to http where the registry
// answers on it.
func BlobsURL(repo name.Repository) string {
	return "https://" + repo.RegistryStr() + "/v2/" + repo.RepositoryStr() + "/blobs/"
}

// getFirst tries each endpoint of ref in turn, as containerd does, and
// returns the first answer and the endpoint that gave it.
func getFirst(ctx context.Context, ref string, opts Options) (*remote.Descriptor, Target, error) {
	targets, err := Targets(ctx, ref, opts)
	if err != nil {
		return nil, Target{}, err
	}
	var errs []error
	for _, t := range targets {
		desc, err := remote.Get(t.Ref, t.Options...)
		if err == nil {
			return desc, t, nil
		}
		if len(targets) == 1 {
			return nil, Target{}, err
		}
		log.G(ctx).WithError(err).WithField("host", t.Ref.Context().RegistryStr()).Debug("registry host failed, trying the next")
		errs = append(errs, fmt.Errorf("%s: %w", t.Ref.Context().RegistryStr(), err))
	}
	return nil, Target{}, errors.Join(errs...)
}

// Target is a reference in a registry with what reaching it takes:
// credentials, the transport policy, a hosts.toml's headers.
type Target struct {
	Ref     name.Reference
	Options []remote.Option
	// transport is Options' transport, for Client.
	transport http.RoundTripper
}

// Client returns an HTTP client for the target's repository with the
// credentials, TLS settings and headers remote calls get, allowed scope
// (transport.PullScope, PushScope): for requests go-containerregistry
// does not make, such as range reads of blobs. URLs may say https; the
// client switches to http where the registry answered on it.
func (t Target) Client(ctx context.Context, scope string) (*http.Client, error) {
	repo := t.Ref.Context()
	auth, err := authn.DefaultKeychain.Resolve(repo)
	if err != nil {
		return nil, fmt.Errorf("credentials for %s: %w", repo, err)
	}
	rt, err := transport.NewWithContext(ctx, repo.Registry, auth, t.transport, []string{repo.Scope(scope)})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", repo, err)
	}
	return &http.Client{Transport: rt}, nil
}

func target(ctx context.Context, ref string, insecure []string, base http.RoundTripper, header http.Header, opts Options) (Target, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return Target{}, fmt.Errorf("parsing reference: %w", err)
	}
	if slices.Contains(insecure, r.Context().RegistryStr()) {
		if r, err = name.ParseReference(ref, name.Insecure); err != nil {
			return Target{}, fmt.Errorf("parsing reference: %w", err)
		}
	}
	rt := newTransport(insecure)
	if base != nil {
		rt = &httpPolicy{secure: base, insecure: base, allowed: insecure}
	}
	tr := http.RoundTripper(withHeader{rt, header})
	remoteOpts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithTransport(tr),
	}
	if opts.UserAgent != "" {
		remoteOpts = append(remoteOpts, remote.WithUserAgent(opts.UserAgent))
		tr = transport.NewUserAgent(tr, opts.UserAgent)
	}
	return Target{Ref: r, Options: remoteOpts, transport: tr}, nil
}

// Targets returns where the registry image ref can be pulled from: the
// endpoints a hosts.toml configures for its registry, mirrors first and
// the registry itself last, or the registry as named.
func Targets(ctx context.Context, ref string, opts Options) ([]Target, error) {
	return targets(ctx, ref, opts, docker.HostCapabilityPull)
}

// Server returns the registry of ref itself, not a mirror: the host a
// hosts.toml lets push, or the registry as named.
func Server(ctx context.Context, ref string, opts Options) (Target, error) {
	t, err := targets(ctx, ref, opts, docker.HostCapabilityPush)
	if err != nil {
		return Target{}, err
	}
	return t[len(t)-1], nil
}

func targets(ctx context.Context, ref string, opts Options, c docker.HostCapabilities) ([]Target, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("parsing reference: %w", err)
	}
	hosts, err := configuredHostsWith(ctx, opts.HostsDir, r, c)
	if err != nil {
		return nil, err
	}
	if len(hosts) == 0 {
		t, err := target(ctx, r.String(), opts.Insecure, nil, http.Header{}, opts)
		if err != nil {
			return nil, err
		}
		return []Target{t}, nil
	}
	var out []Target
	for _, h := range hosts {
		if h.Path != "/v2" {
			continue // go-containerregistry speaks to registries at /v2 only
		}
		insecure := append([]string(nil), opts.Insecure...)
		if h.Scheme == "http" {
			insecure = append(insecure, h.Host)
		}
		var base http.RoundTripper = remote.DefaultTransport
		if h.Client != nil && h.Client.Transport != nil {
			base = h.Client.Transport
		}
		t, err := target(ctx, h.Host+"/"+r.Context().RepositoryStr()+separator(r)+r.Identifier(), insecure, base, h.Header, opts)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("hosts configuration for %s: no host at /v2", r.Context().RegistryStr())
	}
	return out, nil
}

// withHeader adds configured headers to every request.
type withHeader struct {
	rt     http.RoundTripper
	header http.Header
}

func (w withHeader) RoundTrip(req *http.Request) (*http.Response, error) {
	if len(w.header) > 0 {
		req = req.Clone(req.Context())
		for k, v := range w.header {
			req.Header[k] = append(req.Header[k], v...)
		}
	}
	return w.rt.RoundTrip(req)
}

// httpPolicy lets plain HTTP (and unverified TLS) reach only loopback
// registries and those the user named as insecure. go-containerregistry
// would otherwise fall back to HTTP for private (RFC 1918) addresses too.
type httpPolicy struct {
	secure   http.RoundTripper
	insecure http.RoundTripper
	allowed  []string
}

func newTransport(insecure []string) http.RoundTripper {
	secure := remote.DefaultTransport.(*http.Transport).Clone()
	lax := secure.Clone()
	lax.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // only for registries the user named insecure
	return &httpPolicy{secure: secure, insecure: lax, allowed: insecure}
}

func (p *httpPolicy) RoundTrip(req *http.Request) (*http.Response, error) {
	named := slices.Contains(p.allowed, req.URL.Host)
	if req.URL.Scheme == "http" && !named && !isLoopback(req.URL.Hostname()) {
		return nil, fmt.Errorf("refusing plain HTTP to %s: only loopback registries and those given with --insecure-registry may use it", req.URL.Host)
	}
	if named {
		return p.insecure.RoundTrip(req)
	}
	return p.secure.RoundTrip(req)
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
