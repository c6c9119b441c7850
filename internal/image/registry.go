package image

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"slices"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// fromRegistry resolves a reference against its registry, with the
// credentials of the user's docker config.json (auths, credsStore,
// credHelpers).
func fromRegistry(ctx context.Context, ref string, want ocispec.Platform, opts Options) (*Image, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("parsing reference: %w", err)
	}
	hosts, err := configuredHosts(ctx, opts.HostsDir, r)
	if err != nil {
		return nil, err
	}
	var desc *remote.Descriptor
	if hosts == nil {
		desc, err = get(ctx, r.String(), opts.Insecure, nil, http.Header{}, opts)
	} else {
		desc, err = getFromHosts(ctx, r, hosts, opts)
	}
	if err != nil {
		return nil, err
	}
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
		img, err = describe(v1img, plat, want, openCompressed)
		if err != nil {
			return nil, err
		}
	} else {
		v1img, err := desc.Image()
		if err != nil {
			return nil, err
		}
		img, err = describe(v1img, ocispec.Platform{}, want, openCompressed)
		if err != nil {
			return nil, err
		}
	}
	img.Remote = true
	return img, nil
}

// get fetches the descriptor ref names. insecure lists the registries
// that may use plain HTTP; base and header, when set, are the transport
// and headers a hosts.toml configured.
func get(ctx context.Context, ref string, insecure []string, base http.RoundTripper, header http.Header, opts Options) (*remote.Descriptor, error) {
	var nameOpts []name.Option
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("parsing reference: %w", err)
	}
	if slices.Contains(insecure, r.Context().RegistryStr()) {
		nameOpts = append(nameOpts, name.Insecure)
		if r, err = name.ParseReference(ref, nameOpts...); err != nil {
			return nil, fmt.Errorf("parsing reference: %w", err)
		}
	}
	rt := newTransport(insecure)
	if base != nil {
		rt = &httpPolicy{secure: base, insecure: base, allowed: insecure}
	}
	remoteOpts := []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithTransport(withHeader{rt, header}),
	}
	if opts.UserAgent != "" {
		remoteOpts = append(remoteOpts, remote.WithUserAgent(opts.UserAgent))
	}
	return remote.Get(r, remoteOpts...)
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
