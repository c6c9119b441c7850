package fstree

import (
	"fmt"
	"slices"
	"testing"
	"time"
	"unsafe"
)

// TestStamp: the compact times keep every time a tar header can give,
// to the nanosecond, before 1970 and past 2038 and 2106 alike.
func TestStamp(t *testing.T) {
	for _, want := range []time.Time{
		{}, // what an entry without times has
		time.Unix(0, 0),
		time.Unix(-1, 999_999_999),
		time.Unix(-1<<31-1, 1),
		time.Unix(1<<31, 123_456_789),
		time.Unix(1<<32+1, 5),
		time.Unix(1<<40, 999_999_999),
		time.Unix(-1<<40, 0),
		time.Date(1901, 12, 13, 20, 45, 51, 7, time.UTC),
		time.Date(2446, 5, 10, 22, 38, 56, 1, time.UTC),
	} {
		got := makeStamp(want).time()
		if !got.Equal(want) || got.IsZero() != want.IsZero() {
			t.Errorf("%v (%d.%09d) comes back as %v (%d.%09d)", want, want.Unix(), want.Nanosecond(), got, got.Unix(), got.Nanosecond())
		}
	}
}

// TestLargeDirectory: a directory that outgrows a sorted slice of names
// keeps every name, in order, whatever order the layers give them in,
// and names stay removable on both sides of the change.
func TestLargeDirectory(t *testing.T) {
	const n = 3 * maxSorted
	name := func(i int) string { return fmt.Sprintf("big/f%05d", i) }
	var lower, upper []entry
	lower = append(lower, dir("small"), file("small/b", ""), file("small/a", ""), file("small/c", ""))
	for i := n - 1; i >= 0; i-- { // reverse order: each name goes first
		lower = append(lower, file(name(i), ""))
	}
	var want []string
	for i := range n {
		if i%3 == 0 {
			upper = append(upper, whiteout(name(i)))
			continue
		}
		want = append(want, name(i)[len("big/"):])
	}
	upper = append(upper, whiteout("small/b"))
	tr, err := New("", t.TempDir()+"/data", time.Unix(0, 0)) // only the names are tested
	if err != nil {
		t.Fatal(err)
	}
	apply(t, tr, lower, upper)

	big := tr.Lookup("big")
	if got := big.ChildNames(); !slices.Equal(got, want) {
		t.Errorf("big holds %d names, want %d, in order", len(got), len(want))
	}
	if big.children.byName == nil || len(big.children.sorted) > maxSorted {
		t.Errorf("a directory of %d names keeps %d in a sorted slice", n, len(big.children.sorted))
	}
	for _, w := range want {
		if c := big.Child(w); c == nil || c.Name() != w {
			t.Fatalf("Child(%q) = %v", w, c)
		}
	}
	if big.Child("f00000") != nil || tr.Lookup("big/f00003") != nil {
		t.Errorf("a whited-out name is still there")
	}
	small := tr.Lookup("small")
	if got := small.ChildNames(); !slices.Equal(got, []string{"a", "c"}) || small.children.byName != nil {
		t.Errorf("small holds %q (map %v), want [a c] in a slice", got, small.children.byName != nil)
	}
	var walked []string
	_ = tr.Walk(func(n *Node) error {
		if n.Parent() == big {
			walked = append(walked, n.Name())
		}
		return nil
	})
	if !slices.Equal(walked, want) {
		t.Errorf("Walk visits %d names of big, want %d, in order", len(walked), len(want))
	}
}

// TestNodeSize: an entry's name and inode, what an image of millions of
// entries holds millions of, stay within 128 bytes.
func TestNodeSize(t *testing.T) {
	if size := unsafe.Sizeof(namedInode{}); size > 128 {
		t.Errorf("a node and its inode take %d bytes, want at most 128", size)
	}
}
