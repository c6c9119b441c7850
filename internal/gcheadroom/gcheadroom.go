// Package gcheadroom bounds how far the Go heap grows past what is live
// before the garbage collector runs.
//
// By default (GOGC=100) Go lets the heap grow to twice what was live
// after the last collection. Most of kiln's heap is the tree of the
// image being built, which stays live until the image is written: for an
// image of millions of entries, that doubling is hundreds of megabytes
// of memory for garbage that a few tens of megabytes would hold. After
// each collection, Start sets the soft memory limit to what the runtime
// then holds plus a headroom of a quarter of the live heap, at least
// MinHeadroom. A small heap still collects by GOGC, which comes first;
// only a large one is bounded, and the limit follows it as it grows.
package gcheadroom

import (
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
)

// MinHeadroom is the least room given to garbage.
const MinHeadroom = 32 << 20

// Start bounds the headroom from the next collection on, unless
// GOMEMLIMIT sets a limit of its own.
func Start() {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	arm()
}

// sentinel is an object nothing refers to, so that each collection
// runs its cleanup; a pointer field keeps it out of the tiny allocator,
// whose blocks outlive the objects in them.
type sentinel struct{ _ *int }

func arm() {
	runtime.AddCleanup(&sentinel{}, func(struct{}) {
		debug.SetMemoryLimit(Limit())
		arm()
	}, struct{}{})
}

// Limit is the soft memory limit for the heap the last collection left:
// the memory the runtime holds besides heap objects and free pages
// (stacks, its own structures, fragmentation), what is live, and the
// headroom.
func Limit() int64 {
	samples := []metrics.Sample{
		{Name: "/gc/heap/live:bytes"},
		{Name: "/memory/classes/total:bytes"},
		{Name: "/memory/classes/heap/released:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}
	metrics.Read(samples)
	v := func(i int) int64 { return int64(samples[i].Value.Uint64()) }
	live := v(0)
	other := v(1) - v(2) - v(3) - v(4)
	return other + live + max(MinHeadroom, live/4)
}
