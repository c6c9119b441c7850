package image

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/google/go-containerregistry/pkg/name"
)

// DefaultHostsDir is where containerd keeps its registry host
// configuration (hosts.toml files: mirrors, TLS, headers).
const DefaultHostsDir = "/etc/containerd/certs.d"

// configuredHosts returns the endpoints a containerd hosts.toml configures
// for the registry of r (mirrors first, in order), or nil when there is no
// configuration for it: then the registry is used as named.
func configuredHosts(ctx context.Context, hostsDir string, r name.Reference) ([]docker.RegistryHost, error) {
	return configuredHostsWith(ctx, hostsDir, r, docker.HostCapabilityPull)
}

// configuredHostsWith is configuredHosts for the hosts with capability c.
func configuredHostsWith(ctx context.Context, hostsDir string, r name.Reference, c docker.HostCapabilities) ([]docker.RegistryHost, error) {
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
	var able []docker.RegistryHost
	for _, h := range hosts {
		if h.Capabilities.Has(c) {
			able = append(able, h)
		}
	}
	if len(able) == 0 && c == docker.HostCapabilityPull {
		return nil, fmt.Errorf("hosts configuration for %s in %s allows no host to pull", registry, hostsDir)
	}
	return able, nil
}

func separator(r name.Reference) string {
	if strings.HasPrefix(r.Identifier(), "sha256:") {
		return "@"
	}
	return ":"
}
