// Package service wires kiln's snapshotter and differ into one gRPC server
// speaking containerd's Snapshots and Diff APIs (with containerd's own
// snapshotservice and diffservice), and connects to containerd for the
// layer blobs in its content store and what its image store knows.
package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	namespacesapi "github.com/containerd/containerd/api/services/namespaces/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/content/proxy"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnfs/kiln/config"
	"github.com/kilnfs/kiln/internal/build"
	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/guest"
	"github.com/kilnfs/kiln/internal/image"
	"github.com/kilnfs/kiln/internal/inject"
	"github.com/kilnfs/kiln/internal/version"
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
	listener    net.Listener
	lock        *os.File // held on the root while kiln runs
}

// New opens kiln's state and its socket, and prepares the server; Serve
// starts it. It refuses a root or socket directory other local users
// could change, a root another kiln serves, and a socket in use.
func New(ctx context.Context, cfg config.Config) (_ *Service, err error) {
	perm, err := config.ParseSocketMode(cfg.SocketMode)
	if err != nil {
		return nil, fmt.Errorf("config: socket_mode: %w", err)
	}
	gid, err := lookupGroup(cfg.SocketGroup)
	if err != nil {
		return nil, err
	}
	size, err := config.ParseSize(cfg.Build.Size)
	if err != nil {
		return nil, err
	}
	writer, err := build.WriterNamed(cfg.Build.Writer)
	if err != nil {
		return nil, err
	}
	defSize, err := config.ParseSize(cfg.Snapshotter.DefaultSize)
	if err != nil {
		return nil, err
	}
	grace, err := time.ParseDuration(cfg.Snapshotter.UnusedDiskGrace)
	if err != nil {
		return nil, fmt.Errorf("config: snapshotter.unused_disk_grace: %w", err)
	}
	lazyTimeout, err := time.ParseDuration(cfg.Share.LazyTimeout)
	if err != nil {
		return nil, fmt.Errorf("config: share.lazy_timeout: %w", err)
	}
	bootWindow, err := time.ParseDuration(cfg.Share.LazyBootWindow)
	if err != nil {
		return nil, fmt.Errorf("config: share.lazy_boot_window: %w", err)
	}
	chunkBudget, err := cfg.Share.CacheBudget()
	if err != nil {
		return nil, err
	}
	pieces, err := guest.ParsePieces(strings.Join(cfg.Build.Inject, ","))
	if err != nil {
		return nil, err
	}
	limits, err := cfg.Limits.Parse()
	if err != nil {
		return nil, err
	}
	injectOpts := inject.Options{Pieces: pieces, Dir: cfg.Build.InjectDir, Force: cfg.Build.Force, BinDir: cfg.Build.GuestBinDir}
	if _, err := inject.New(injectOpts); err != nil {
		return nil, fmt.Errorf("config: build.inject: %w", err) // missing guest binaries, a bad bundle
	}
	// Root and socket first, before other work: a second kiln must stop
	// before it touches the first's state, and the socket is made under
	// a umask that must not reach other files.
	lock, err := openRoot(cfg.Root)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			lock.Close()
		}
	}()
	ln, err := listen(cfg.Address, perm, gid)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			ln.Close()
		}
	}()
	// The connection is made lazily: containerd may start after kiln
	// (kiln's unit starts before containerd's). Calls wait for it rather
	// than fail while an earlier attempt backs off, and the back-off
	// stays short.
	conn, err := grpc.NewClient("unix://"+cfg.ContainerdAddress,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second,
		}}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.WaitForReady(true)))
	if err != nil {
		return nil, fmt.Errorf("containerd %s: %w", cfg.ContainerdAddress, err)
	}
	cs := proxy.NewContentStore(contentapi.NewContentClient(conn))
	m := newMetrics()
	sn, err := snapshotter.New(ctx, snapshotter.Config{
		Root:             cfg.Root,
		BlockDevices:     cfg.Snapshotter.BlockDevices,
		ContainerMode:    cfg.Snapshotter.ContainerMode,
		DefaultSize:      defSize,
		MaxBuilds:        cfg.Snapshotter.MaxConcurrentBuilds,
		EagerBuild:       cfg.Snapshotter.EagerBuild,
		UnusedDiskGrace:  grace,
		Build:            build.Options{Size: size, Writer: writer, Limits: limits, Verity: cfg.Build.Verity},
		Inject:           injectOpts,
		Images:           newContainerdImages(imagesapi.NewImagesClient(conn), namespacesapi.NewNamespacesClient(conn), cs),
		ObserveBuild:     m.observeBuild,
		ObserveBuildWait: m.observeBuildWait,
		Share: snapshotter.Share{
			Pull: cfg.Share.Pull, Push: cfg.Share.Push,
			Lazy: cfg.Share.Lazy, LazyTimeout: lazyTimeout, LazyPrefetch: cfg.Share.LazyPrefetch,
			LazyBootWindow: bootWindow, LazyCacheMaxSize: chunkBudget,
			Image: image.Options{HostsDir: cfg.Share.HostsDir, Insecure: cfg.Share.Insecure, UserAgent: version.UserAgent()},
		},
		ObserveShare: m.observeShare,
	})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("snapshotter: %w", err)
	}
	m.register(sn)
	d := differ.New(differSnapshots{sn, limits}, cs, differ.Streamed(contentapi.NewContentClient(conn)), leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn)), m.observeApply)

	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(m.unaryInterceptor), grpc.ChainStreamInterceptor(m.streamInterceptor))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	diffapi.RegisterDiffServer(srv, diffservice.FromApplierAndComparer(d, d))
	return &Service{cfg: cfg, Snapshotter: sn, Differ: d, server: srv, containerd: conn, metrics: m, listener: ln, lock: lock}, nil
}

// differSnapshots is the snapshotter as the differ sees it.
type differSnapshots struct {
	sn     *snapshotter.Snapshotter
	limits fstree.Limits
}

func (s differSnapshots) Limits() fstree.Limits { return s.limits }

func (s differSnapshots) Extraction(mounts []mount.Mount) (differ.Extraction, bool) {
	dir, ok := s.sn.ExtractionDir(mounts)
	if !ok {
		return differ.Extraction{}, false
	}
	return differ.Extraction{Dir: dir}, true
}

func (s differSnapshots) Store(ctx context.Context, ext differ.Extraction, r io.Reader, name string, syncFs bool, diffID func() (digest.Digest, error)) (int64, error) {
	return s.sn.StoreLayer(ctx, ext.Dir, r, name, s.limits, syncFs, diffID)
}

func (s differSnapshots) Disks(mounts []mount.Mount) (differ.Disks, bool) {
	d, ok := s.sn.ResolveDisks(mounts)
	return differ.Disks{Disk: d.Disk, Scratch: d.Scratch, Container: d.Container}, ok
}

func (s differSnapshots) InUse(file string) string { return snapshotter.DiskInUse(file) }

// Serve serves on the configured socket until ctx ends, then stops
// gracefully.
func (s *Service) Serve(ctx context.Context, ready func()) error {
	var err error
	errc := make(chan error, 2)
	go func() { errc <- s.server.Serve(s.listener) }()
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
	watchCtx, stopWatching := context.WithCancel(ctx)
	defer stopWatching()
	go watchImages(watchCtx, eventsapi.NewEventsClient(s.containerd), s.Snapshotter.Sweep)
	log.G(ctx).WithFields(log.Fields{
		"address": s.cfg.Address, "socket_mode": s.cfg.SocketMode, "root": s.cfg.Root, "containerd": s.cfg.ContainerdAddress,
		"container_mode": s.cfg.Snapshotter.ContainerMode,
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

// Close releases kiln's state, and the root's lock last.
func (s *Service) Close() error {
	s.listener.Close() // when Serve did not run; removes the socket
	s.containerd.Close()
	err := s.Snapshotter.Close()
	s.lock.Close()
	return err
}
