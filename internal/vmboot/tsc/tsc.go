// Package tsc measures the host's time stamp counter (TSC) frequency.
//
// QEMU's TCG accelerator gives the guest the host's TSC unscaled, so this is
// also the frequency the guest sees. A guest kernel told the frequency
// (tsc_early_khz=) does not have to calibrate the TSC itself, which on QEMU's
// microvm machine it can only do against the PIT, and which under emulation
// fails often enough to hang one boot in three.
package tsc

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// ErrUnsupported reports a host whose TSC this package cannot read.
var ErrUnsupported = errors.New("reading the TSC is only supported on amd64 hosts")

const (
	// samples and sampleTime trade accuracy for start-up delay: three
	// 10 ms samples give the frequency to well under 0.1% and their median
	// ignores one sample disturbed by preemption.
	samples    = 3
	sampleTime = 10 * time.Millisecond
	// Bounds of a plausible TSC frequency, to catch a broken measurement.
	minKHz = 100_000
	maxKHz = 10_000_000
)

var measured = sync.OnceValues(measure)

// FrequencyKHz returns the host's TSC frequency in kHz. It is measured
// against the monotonic clock on the first call, which takes about 30 ms.
func FrequencyKHz() (int64, error) { return measured() }

func measure() (int64, error) {
	if !supported {
		return 0, ErrUnsupported
	}
	khz := make([]int64, samples)
	for i := range khz {
		start, c0 := time.Now(), rdtsc()
		time.Sleep(sampleTime)
		c1, elapsed := rdtsc(), time.Since(start)
		khz[i] = int64(float64(c1-c0) / float64(elapsed.Nanoseconds()) * 1e6)
	}
	slices.Sort(khz)
	f := khz[samples/2]
	if f < minKHz || f > maxKHz {
		return 0, fmt.Errorf("measured an implausible TSC frequency of %d kHz", f)
	}
	return f, nil
}
