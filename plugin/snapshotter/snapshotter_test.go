package snapshotter

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kilnfs/kiln/internal/testenv"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "needs root: the suite loop-mounts the snapshots' ext4 files")
	}
	for _, tool := range []string{"mke2fs", "debugfs", "resize2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, "%s not installed (e2fsprogs)", tool)
		}
	}
}

func newTestSnapshotter(ctx context.Context, root, mode string) (*Snapshotter, error) {
	return New(ctx, Config{Root: root, DefaultSize: 64 << 20, ContainerMode: mode})
}

// suiteName is the name containerd's conformance suite knows a container
// mode by. An overlay-mode container is an overlayfs mount, so the suite
// checks it as containerd's own overlayfs snapshotter: without
// redirect_dir, renaming a lower layer's directory fails with EXDEV,
// which the suite leaves out for overlayfs (and erofs) alone.
var suiteName = map[string]string{ModeOverlay: "overlayfs", ModeCopy: "kiln-copy"}

// TestSuite runs containerd's snapshotter conformance suite in process,
// in each container mode.
func TestSuite(t *testing.T) {
	needRoot(t)
	for _, mode := range []string{ModeOverlay, ModeCopy} {
		t.Run(mode, func(t *testing.T) {
			testsuite.SnapshotterSuite(t, suiteName[mode], func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				sn, err := newTestSnapshotter(ctx, root, mode)
				if err != nil {
					return nil, nil, err
				}
				return sn, sn.Close, nil
			})
		})
	}
}

// TestSuiteOverGRPC runs the suite through containerd's snapshots proxy
// client, as containerd talks to kiln serve.
func TestSuiteOverGRPC(t *testing.T) {
	needRoot(t)
	testsuite.SnapshotterSuite(t, suiteName[ModeOverlay], func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := newTestSnapshotter(ctx, root, ModeOverlay)
		if err != nil {
			return nil, nil, err
		}
		sock := filepath.Join(root, "kiln.sock")
		ln, err := net.Listen("unix", sock)
		if err != nil {
			return nil, nil, err
		}
		srv := grpc.NewServer()
		snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
		go srv.Serve(ln) //nolint:errcheck // ends with Stop
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, nil, err
		}
		client := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "kiln")
		return client, func() error {
			conn.Close()
			srv.Stop()
			return sn.Close()
		}, nil
	})
}
