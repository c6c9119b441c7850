package snapshotter

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Stats is what an operator watches of the snapshotter.
type Stats struct {
	// Bytes is the disk used, by kind: "layers" (stored layer tars and
	// what containerd's walking differ unpacked), "disks" (the shared
	// images' disks), "containers" (containers' own disks) and
	// "templates" (empty scratch disks containers are copied from),
	// with Share.Lazy also "chunks" (the chunk cache of lazily loaded
	// disks).
	Bytes map[string]int64
	// Containers counts containers' disks by container mode.
	Containers map[string]int
	// LoopDevices is how many loop devices kiln has attached.
	LoopDevices int
	// UnsyncedDisks is how many disks have not reached stable storage
	// yet.
	UnsyncedDisks int
	// BuildsWaiting is how many disk builds wait for a slot, "urgent"
	// (somebody waits for them) and "eager".
	BuildsWaiting map[string]int
	// LazyDisks is how many lazily loaded disks are mounted, and
	// LazyFetchedBytes what was fetched for them since kiln started
	// (compressed).
	LazyDisks        int
	LazyFetchedBytes int64
}

// Stats measures the snapshotter's state now.
func (s *Snapshotter) Stats() Stats {
	st := Stats{
		Bytes:         map[string]int64{"layers": 0, "disks": 0, "containers": 0, "templates": 0},
		Containers:    map[string]int{ModeOverlay: 0, ModeCopy: 0},
		LoopDevices:   s.loops.count(),
		BuildsWaiting: map[string]int{},
	}
	st.BuildsWaiting["urgent"], st.BuildsWaiting["eager"] = s.queue.depth()
	dirs, _ := os.ReadDir(filepath.Join(s.root, snapshotsDir))
	for _, d := range dirs {
		if strings.HasPrefix(d.Name(), removingPrefix) {
			continue
		}
		dir := filepath.Join(s.root, snapshotsDir, d.Name())
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			switch e.Name() {
			case layerTar, layerData, layerRecord:
				st.Bytes["layers"] += allocated(p)
			case upperDir:
				st.Bytes["layers"] += treeAllocated(p)
			case diskFile:
				st.Bytes["disks"] += allocated(p)
			case unsyncedFile:
				st.UnsyncedDisks++
			case scratchFile:
				st.Bytes["containers"] += allocated(p)
				st.Containers[ModeOverlay]++
			case containerFile:
				st.Bytes["containers"] += allocated(p)
				st.Containers[ModeCopy]++
			}
		}
	}
	st.Bytes["templates"] = treeAllocated(filepath.Join(s.root, templatesDir))
	if s.lazy != nil {
		st.Bytes["chunks"] = s.lazy.chunkBytes()
		st.LazyDisks, st.LazyFetchedBytes = s.lazy.stats()
	}
	return st
}

// allocated is the disk a file takes (holes excluded).
func allocated(p string) int64 {
	var st syscall.Stat_t
	if syscall.Lstat(p, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

func treeAllocated(dir string) int64 {
	u, _ := diskUsage(dir)
	return u.Size
}
