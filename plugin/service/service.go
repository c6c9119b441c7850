// Package service wires kiln's snapshotter and differ into one gRPC server
// speaking containerd's Snapshots and Diff APIs (with containerd's own
// snapshotservice and diffservice), and connects to containerd's content
// store for the layer blobs.
package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/proxy"
	cimages "github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnfs/kiln/config"
	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/plugin/differ"
	"github.com/kilnfs/kiln/plugin/snapshotter"
)

// Service is a running kiln daemon.
type Service struct {
	cfg         config.Config
	Snapshotter *snapshotter.Snapshotter
	Differ      *differ.Differ
	server      *grpc.Server
	containerd  *grpc.ClientConn
	metrics     *metrics
}

// New opens kiln's state and prepares the server; Serve starts it.
func New(ctx context.Context, cfg config.Config) (*Service, error) {
	size, err := config.ParseSize(cfg.Build.Size)
	if err != nil {
		return nil, err
	}
	defSize, err := config.ParseSize(cfg.Snapshotter.DefaultSize)
	if err != nil {
		return nil, err
	}
	pieces, err := guest.ParsePieces(strings.Join(cfg.Build.Inject, ","))
	if err != nil {
		return nil, err
	}
	// The connection is made lazily: containerd may start after kiln.
	conn, err := grpc.NewClient("unix://"+cfg.ContainerdAddress,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, fmt.Errorf("containerd %s: %w", cfg.ContainerdAddress, err)
	}
	injectOpts := inject.Options{Pieces: pieces, Dir: cfg.Build.InjectDir, Force: cfg.Build.Force, BinDir: cfg.Build.GuestBinDir}
	if _, err := inject.New(injectOpts, []byte("{}")); err != nil {
		conn.Close()
		return nil, fmt.Errorf("config: build.inject: %w", err) // missing guest binaries, a bad bundle
	}
	cs := namespacedProvider{proxy.NewContentStore(contentapi.NewContentClient(conn))}
	m := newMetrics()
	sn, err := snapshotter.New(ctx, snapshotter.Config{
		Root:         cfg.Root,
		BlockDevices: cfg.Snapshotter.BlockDevices,
		DefaultSize:  defSize,
		Build:        build.Options{Size: size},
		Inject:       injectOpts,
		ImageConfig:  imageConfigFinder(imagesapi.NewImagesClient(conn), cs),
		EagerBuild:   cfg.Snapshotter.EagerBuild,
		ObserveBuild: m.observeBuild,
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("snapshotter: %w", err)
	}
	d := differ.New(sn, cs, snapshotter.LayerFiles)
	d.Stage = func(ctx context.Context, dir string) differ.LayerSink {
		if sink := sn.StageLayer(ctx, dir); sink != nil {
			return sink
		}
		return nil
	}
	d.Observe = m.observeApply

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	diffapi.RegisterDiffServer(srv, diffservice.FromApplierAndComparer(d, d))
	return &Service{cfg: cfg, Snapshotter: sn, Differ: d, server: srv, containerd: conn, metrics: m}, nil
}

// namespacedProvider passes the namespace of the request kiln is serving
// on to containerd: the content a differ reads is the namespace's.
type namespacedProvider struct{ content.Provider }

func (p namespacedProvider) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	if ns, ok := namespaces.Namespace(ctx); ok {
		ctx = namespaces.WithNamespace(ctx, ns)
	}
	return p.Provider.ReaderAt(ctx, desc)
}

// imageConfigFinder finds, in containerd's image store, the config of an
// image (for this host's platform) whose layers make a chain. When several
// images share the chain, the most recently updated one wins.
func imageConfigFinder(images imagesapi.ImagesClient, cs content.Provider) func(context.Context, string, digest.Digest) ([]byte, error) {
	return func(ctx context.Context, ns string, chainID digest.Digest) ([]byte, error) {
		ctx = namespaces.WithNamespace(ctx, ns)
		resp, err := images.List(ctx, &imagesapi.ListImagesRequest{})
		if err != nil {
			return nil, errgrpc.ToNative(err)
		}
		var (
			found   []byte
			updated time.Time
		)
		for _, img := range resp.Images {
			desc, err := cimages.Config(ctx, cs, oci.DescriptorFromProto(img.Target), platforms.Default())
			if err != nil {
				continue // another platform, or content not there
			}
			raw, err := content.ReadBlob(ctx, cs, desc)
			if err != nil {
				continue
			}
			var cfg ocispec.Image
			if json.Unmarshal(raw, &cfg) != nil || identity.ChainID(cfg.RootFS.DiffIDs) != chainID {
				continue
			}
			if t := img.UpdatedAt.AsTime(); found == nil || t.After(updated) {
				found, updated = raw, t
			}
		}
		if found == nil {
			return nil, fmt.Errorf("image config for chain %s: %w", chainID, errdefs.ErrNotFound)
		}
		return found, nil
	}
}

// Serve listens on the configured socket and serves until ctx ends, then
// stops gracefully.
func (s *Service) Serve(ctx context.Context, ready func()) error {
	ln, err := listen(s.cfg.Address)
	if err != nil {
		return err
	}
	errc := make(chan error, 2)
	go func() { errc <- s.server.Serve(ln) }()
	var metricsSrv *http.Server
	if s.cfg.MetricsAddress != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(s.metrics.registry, promhttp.HandlerOpts{}))
		metricsSrv = &http.Server{Addr: s.cfg.MetricsAddress, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := metricsSrv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics: %w", err)
			}
		}()
	}
	log.G(ctx).WithFields(log.Fields{
		"address": s.cfg.Address, "root": s.cfg.Root, "containerd": s.cfg.ContainerdAddress,
	}).Info("kiln serving containerd's snapshots and diff APIs")
	if ready != nil {
		ready()
	}
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	stopped := make(chan struct{})
	go func() { s.server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		s.server.Stop()
	}
	if metricsSrv != nil {
		metricsSrv.Close()
	}
	return err
}

// Close releases kiln's state.
func (s *Service) Close() error {
	s.containerd.Close()
	return s.Snapshotter.Close()
}

// listen opens the unix socket: owned by root, mode 0660, replacing a
// stale socket from an earlier run.
func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, err
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, err
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(path, 0, 0); err != nil {
			ln.Close()
			return nil, err
		}
	}
	return ln, nil
}

type metrics struct {
	registry     *prometheus.Registry
	applySeconds prometheus.Histogram
	applyBytes   prometheus.Counter
	applyErrors  prometheus.Counter
	buildSeconds prometheus.Histogram
	buildErrors  prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "kiln", Name: "layer_apply_seconds", Help: "Time to store a layer blob in a snapshot.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 12),
		}),
		applyBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "kiln", Name: "layer_apply_bytes_total", Help: "Uncompressed layer bytes stored.",
		}),
		applyErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "kiln", Name: "layer_apply_errors_total", Help: "Layers that failed to verify or store.",
		}),
		buildSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "kiln", Name: "rootfs_build_seconds", Help: "Time to build an image's ext4 rootfs.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 12),
		}),
		buildErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "kiln", Name: "rootfs_build_errors_total", Help: "Rootfs builds that failed.",
		}),
	}
	m.registry.MustRegister(m.applySeconds, m.applyBytes, m.applyErrors, m.buildSeconds, m.buildErrors,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) observeApply(d time.Duration, bytes int64, err error) {
	if err != nil {
		m.applyErrors.Inc()
		return
	}
	m.applySeconds.Observe(d.Seconds())
	m.applyBytes.Add(float64(bytes))
}

func (m *metrics) observeBuild(d time.Duration, err error) {
	if err != nil {
		if !errors.Is(err, context.Canceled) {
			m.buildErrors.Inc()
		}
		return
	}
	m.buildSeconds.Observe(d.Seconds())
}
