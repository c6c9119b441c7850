package image

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// DefaultHostsDir is where containerd keeps its registry host
// configuration (hosts.toml files: mirrors, TLS, headers).
const DefaultHostsDir = "/etc/containerd/certs.d"

// configuredHosts returns the endpoints a containerd hosts.toml configures
// for the registry of r (mirrors first, in order), or nil when there is no
// configuration for it: then the registry is used as named.
func configuredHosts(ctx context.Context, hostsDir string, r name.Reference) ([]docker.RegistryHost, error) {
	if hostsDir == "" {
		return nil, nil
	}
	if _, err := os.Stat(hostsDir); err != nil {
		return nil, nil
	}
	registry := r.Context().RegistryStr()
	if registry == name.DefaultRegistry {
		registry = "docker.io" // containerd's name for it
	}
	dirOf := config.HostDirFromRoot(hostsDir)
	if _, err := dirOf(registry); err != nil {
		return nil, nil //nolint:nilerr // no hosts.toml for this registry
	}
	hosts, err := config.ConfigureHosts(ctx, config.HostOptions{HostDir: dirOf})(registry)
	if err != nil {
		return nil, fmt.Errorf("hosts configuration for %s in %s: %w", registry, hostsDir, err)
	}
	var pull []docker.RegistryHost
	for _, h := range hosts {
		if h.Capabilities.Has(docker.HostCapabilityPull) {
			pull = append(pull, h)
		}
	}
	if len(pull) == 0 {
		return nil, fmt.Errorf("hosts configuration for %s in %s allows no host to pull", registry, hostsDir)
	}
	return pull, nil
}

// getFromHosts tries each configured endpoint in turn, as containerd
// does, and returns the first answer.
func getFromHosts(ctx context.Context, r name.Reference, hosts []docker.RegistryHost, opts Options) (*remote.Descriptor, error) {
	var errs []error
	for _, h := range hosts {
		if h.Path != "/v2" {
			// go-containerregistry speaks to registries at /v2 only.
			errs = append(errs, fmt.Errorf("%s%s: a path other than /v2 is not supported", h.Host, h.Path))
			continue
		}
		ref := h.Host + "/" + r.Context().RepositoryStr() + separator(r) + r.Identifier()
		insecure := append([]string(nil), opts.Insecure...)
		if h.Scheme == "http" {
			insecure = append(insecure, h.Host) // the configuration asks for plain HTTP
		}
		var base http.RoundTripper
		if h.Client != nil {
			base = h.Client.Transport
		}
		if base == nil {
			base = remote.DefaultTransport
		}
		desc, err := get(ctx, ref, insecure, base, h.Header, opts)
		if err == nil {
			return desc, nil
		}
		log.G(ctx).WithError(err).WithField("host", h.Host).Debug("registry host failed, trying the next")
		errs = append(errs, fmt.Errorf("%s: %w", h.Host, err))
	}
	return nil, errors.Join(errs...)
}

func separator(r name.Reference) string {
	if strings.HasPrefix(r.Identifier(), "sha256:") {
		return "@"
	}
	return ":"
}
