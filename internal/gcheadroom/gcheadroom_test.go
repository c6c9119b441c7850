package gcheadroom

import (
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

// TestBoundsHeadroom: with a large live heap, the collector's goal is no
// longer twice the live heap (GOGC=100) but about a quarter past it.
func TestBoundsHeadroom(t *testing.T) {
	if debug.SetGCPercent(100) != 100 || debug.SetMemoryLimit(-1) != math.MaxInt64 {
		t.Skip("GOGC or GOMEMLIMIT is set")
	}
	defer debug.SetMemoryLimit(math.MaxInt64)
	const live = 128 << 20
	keep := make([][]byte, 0, live>>20)
	for range live >> 20 {
		keep = append(keep, make([]byte, 1<<20))
	}
	Start()
	deadline := time.Now().Add(10 * time.Second)
	for debug.SetMemoryLimit(-1) == math.MaxInt64 {
		if time.Now().After(deadline) {
			t.Fatal("no limit set after a collection")
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
	runtime.GC() // with all of keep live, and the limit set
	goal := []metrics.Sample{{Name: "/gc/heap/goal:bytes"}}
	metrics.Read(goal)
	runtime.KeepAlive(keep)
	if got, bound := goal[0].Value.Uint64(), uint64(live+live/2); got > bound {
		t.Errorf("with %d MiB live the heap may grow to %d MiB, want at most %d", live>>20, got>>20, bound>>20)
	}
}
