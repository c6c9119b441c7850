package fusedisk

import (
	"context"
	"testing"
)

// runs is a HoleSource of size bytes whose data is in the given runs.
type runs struct {
	size int64
	data [][2]int64 // [start, end), ascending
}

func (r runs) Size() int64                                        { return r.size }
func (r runs) ReadAt(context.Context, []byte, int64) (int, error) { return 0, nil }

func (r runs) NextData(off int64) int64 {
	for _, d := range r.data {
		if off < d[1] {
			return max(off, d[0])
		}
	}
	return r.size
}

func (r runs) NextHole(off int64) int64 {
	for _, d := range r.data {
		if off < d[0] {
			return off
		}
		if off < d[1] {
			return d[1]
		}
	}
	return off // after the last run: a hole up to the end
}

// stuck contradicts itself: data and a hole at every offset.
type stuck struct{ runs }

func (s stuck) NextData(off int64) int64 { return off }
func (s stuck) NextHole(off int64) int64 { return off }

func TestDataBytes(t *testing.T) {
	for name, c := range map[string]struct {
		src  Source
		want int64
	}{
		"ends in data":  {runs{100, [][2]int64{{10, 20}, {50, 100}}}, 60},
		"ends in hole":  {runs{100, [][2]int64{{0, 20}, {50, 60}}}, 30},
		"all hole":      {runs{100, nil}, 0},
		"all data":      {runs{100, [][2]int64{{0, 100}}}, 100},
		"contradictory": {stuck{runs{100, nil}}, 100},
	} {
		if got := dataBytes(c.src, 100); got != c.want {
			t.Errorf("%s: %d data bytes, want %d", name, got, c.want)
		}
	}
}
