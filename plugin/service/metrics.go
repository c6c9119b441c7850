package service

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/kilnfs/kiln/plugin/snapshotter"
)

// metrics are what kiln serves on /metrics: how layers are stored, how
// disks are built and wait to be, the disk kiln uses, its containers and
// loop devices, and how long each containerd request takes.
type metrics struct {
	registry     *prometheus.Registry
	applySeconds prometheus.Histogram
	applyBytes   prometheus.Counter
	applyErrors  prometheus.Counter
	buildSeconds prometheus.Histogram
	buildErrors  prometheus.Counter
	buildWait    *prometheus.HistogramVec
	rpcSeconds   *prometheus.HistogramVec
	shared       *prometheus.CounterVec
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
			Namespace: "kiln", Name: "disk_build_seconds", Help: "Time to build an image's disk, waiting included.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 12),
		}),
		buildErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "kiln", Name: "disk_build_errors_total", Help: "Disk builds that failed.",
		}),
		buildWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "kiln", Name: "disk_build_wait_seconds",
			Help:    "Time a disk build waited for a build slot, by class: urgent (somebody waits for it) or eager.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"class"}),
		rpcSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "kiln", Name: "grpc_request_seconds", Help: "Time to answer a containerd request, by method and status code.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"method", "code"}),
		shared: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "kiln", Name: "shared_rootfs_total",
			Help: "Disks of an image's top layer with [share] on, by result: fetched (a published rootfs was used), " +
				"built (none was found or verified), published, publish_failed.",
		}, []string{"result"}),
	}
	for _, r := range snapshotter.ShareResults {
		m.shared.WithLabelValues(r) // listed at 0 from the start
	}
	m.registry.MustRegister(m.applySeconds, m.applyBytes, m.applyErrors, m.buildSeconds, m.buildErrors,
		m.buildWait, m.rpcSeconds, m.shared,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// register adds the gauges measured from the snapshotter's state at each
// scrape.
func (m *metrics) register(sn *snapshotter.Snapshotter) {
	m.registry.MustRegister(&stateCollector{sn: sn})
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

func (m *metrics) observeShare(result string) { m.shared.WithLabelValues(result).Inc() }

func (m *metrics) observeBuildWait(urgent bool, d time.Duration) {
	class := "eager"
	if urgent {
		class = "urgent"
	}
	m.buildWait.WithLabelValues(class).Observe(d.Seconds())
}

func (m *metrics) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	m.rpcSeconds.WithLabelValues(info.FullMethod, status.Code(err).String()).Observe(time.Since(start).Seconds())
	return resp, err
}

func (m *metrics) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	start := time.Now()
	err := handler(srv, ss)
	m.rpcSeconds.WithLabelValues(info.FullMethod, status.Code(err).String()).Observe(time.Since(start).Seconds())
	return err
}

// stateCollector reports the snapshotter's state when scraped.
type stateCollector struct{ sn *snapshotter.Snapshotter }

var (
	diskBytesDesc = prometheus.NewDesc("kiln_disk_bytes",
		"Disk used by kiln, by kind: layers, disks (images' shared disks), containers (containers' own disks), templates, chunks (the chunk cache of lazily loaded disks).",
		[]string{"kind"}, nil)
	containersDesc = prometheus.NewDesc("kiln_containers",
		"Containers' disks, by container mode.", []string{"mode"}, nil)
	loopDevicesDesc = prometheus.NewDesc("kiln_loop_devices",
		"Loop devices kiln attached (block-device mode).", nil, nil)
	unsyncedDesc = prometheus.NewDesc("kiln_unsynced_disks",
		"Disks built but not yet on stable storage.", nil, nil)
	buildQueueDesc = prometheus.NewDesc("kiln_disk_build_queue",
		"Disk builds waiting for a build slot, by class: urgent or eager.", []string{"class"}, nil)
	lazyDisksDesc = prometheus.NewDesc("kiln_lazy_disks",
		"Lazily loaded disks served through FUSE ([share] lazy).", nil, nil)
	lazyFetchedDesc = prometheus.NewDesc("kiln_lazy_fetched_bytes_total",
		"Compressed bytes fetched from registries for lazily loaded disks.", nil, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{diskBytesDesc, containersDesc, loopDevicesDesc, unsyncedDesc, buildQueueDesc, lazyDisksDesc, lazyFetchedDesc} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.sn.Stats()
	for kind, n := range st.Bytes {
		ch <- prometheus.MustNewConstMetric(diskBytesDesc, prometheus.GaugeValue, float64(n), kind)
	}
	for mode, n := range st.Containers {
		ch <- prometheus.MustNewConstMetric(containersDesc, prometheus.GaugeValue, float64(n), mode)
	}
	ch <- prometheus.MustNewConstMetric(loopDevicesDesc, prometheus.GaugeValue, float64(st.LoopDevices))
	ch <- prometheus.MustNewConstMetric(unsyncedDesc, prometheus.GaugeValue, float64(st.UnsyncedDisks))
	for class, n := range st.BuildsWaiting {
		ch <- prometheus.MustNewConstMetric(buildQueueDesc, prometheus.GaugeValue, float64(n), class)
	}
	ch <- prometheus.MustNewConstMetric(lazyDisksDesc, prometheus.GaugeValue, float64(st.LazyDisks))
	ch <- prometheus.MustNewConstMetric(lazyFetchedDesc, prometheus.CounterValue, float64(st.LazyFetchedBytes))
}
