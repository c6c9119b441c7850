package power

import "testing"

func TestIsKernelThread(t *testing.T) {
	for _, tc := range []struct {
		stat string
		want bool
	}{
		{"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 6", true},
		{"1 (my init) S 0 1 1 34816 1 4194560 3004 0 11 0", false},
		// A command name with ") " in it must not shift the fields.
		{"7 (a) b) S 1 7 7 0 -1 2129984 0 0", true},
		{"garbage", false},
		{"2 (x) S 0", false},
	} {
		if got := isKernelThread(tc.stat); got != tc.want {
			t.Errorf("isKernelThread(%q) = %v, want %v", tc.stat, got, tc.want)
		}
	}
}
