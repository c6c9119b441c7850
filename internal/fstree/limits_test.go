package fstree

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sparseLayer is a layer holding one sparse file in the PAX 1.0 form GNU
// tar writes: size bytes long, data at offset and holes elsewhere.
// archive/tar cannot write it (it drops GNU.sparse records), so the PAX
// header is written as a plain file and retyped.
func sparseLayer(t testing.TB, name string, size, offset int64, data string) []byte {
	t.Helper()
	var records string
	for _, kv := range [][2]string{
		{"GNU.sparse.major", "1"}, {"GNU.sparse.minor", "0"},
		{"GNU.sparse.name", name}, {"GNU.sparse.realsize", strconv.FormatInt(size, 10)},
	} {
		line := " " + kv[0] + "=" + kv[1] + "\n"
		n := len(line) + 1
		for len(strconv.Itoa(n))+len(line) != n {
			n++
		}
		records += strconv.Itoa(n) + line
	}
	sparseMap := "1\n" + strconv.FormatInt(offset, 10) + "\n" + strconv.Itoa(len(data)) + "\n"
	sparseMap += strings.Repeat("\x00", (512-len(sparseMap)%512)%512)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range []struct{ name, body string }{{"PaxHeaders/" + name, records}, {"GNUSparseFile.0/" + name, sparseMap + data}} {
		if err := tw.WriteHeader(&tar.Header{Name: e.name, Typeflag: tar.TypeReg, Mode: 0o644, ModTime: time.Unix(1700000000, 0), Size: int64(len(e.body)), Format: tar.FormatUSTAR}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
		if err := tw.Flush(); err != nil {
			t.Fatal(err)
		}
		if e.body == records { // retype the first header as PAX, and sum it again
			hdr := buf.Bytes()[:512]
			hdr[156] = tar.TypeXHeader
			copy(hdr[148:156], "        ")
			sum := 0
			for _, b := range hdr {
				sum += int(b)
			}
			copy(hdr[148:156], fmt.Sprintf("%06o\x00 ", sum))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestLimits: each limit stops the image at the entry that passes it,
// naming the limit, the layer and the entry, whether the layer goes into
// a tree or is only checked.
func TestLimits(t *testing.T) {
	xattr := file("x", "")
	xattr.pax = map[string]string{"SCHILY.xattr.user.big": strings.Repeat("v", 200)}
	for _, tc := range []struct {
		limit  string
		limits Limits
		layers [][]entry
		entry  string
		tree   bool // only a tree sees more than one layer
	}{
		{"layer_bytes", Limits{LayerBytes: 10000}, [][]entry{{file("small", "s"), file("big", strings.Repeat("b", 20000))}}, "big", false},
		{"image_bytes", Limits{ImageBytes: 12000}, [][]entry{{file("one", strings.Repeat("1", 6000))}, {file("two", strings.Repeat("2", 6000))}}, "two", true},
		{"entries", Limits{Entries: 3}, [][]entry{{dir("d"), file("d/a", ""), file("d/b", ""), file("d/c", "")}}, "d/c", false},
		{"entries", Limits{Entries: 3}, [][]entry{{file("a", ""), file("b", "")}, {file("c", ""), file("d", "")}}, "d", true},
		{"path_depth", Limits{PathDepth: 3}, [][]entry{{file("a/b/c", ""), file("a/b/c/d", "")}}, "a/b/c/d", false},
		{"file_size", Limits{FileSize: 1000}, [][]entry{{file("f", strings.Repeat("f", 1001))}}, "f", false},
		{"xattr_bytes", Limits{XattrBytes: 100}, [][]entry{{xattr}}, "x", false},
	} {
		check := func(t *testing.T, err error) {
			t.Helper()
			var le *LimitError
			var ee *EntryError
			if !errors.As(err, &le) || le.Name != tc.limit || !errors.As(err, &ee) || ee.Entry != tc.entry || ee.Layer == "" {
				t.Fatalf("err = %v, want the %s limit at entry %q", err, tc.limit, tc.entry)
			}
			if !strings.Contains(err.Error(), tc.limit) || !strings.Contains(err.Error(), tc.entry) {
				t.Errorf("%q should name the limit and the entry", err)
			}
		}
		t.Run(tc.limit, func(t *testing.T) {
			tr := newTree(t)
			tr.SetLimits(tc.limits)
			var err error
			for i, l := range tc.layers {
				if err = tr.Apply(context.Background(), bytes.NewReader(layerTar(t, l...)), "sha256:l"+strconv.Itoa(i)); err != nil {
					break
				}
			}
			check(t, err)
			if !tc.tree {
				check(t, Check(context.Background(), bytes.NewReader(layerTar(t, tc.layers[0]...)), "sha256:l0", tc.limits))
			}
		})
	}
}

// TestSparseEntries: a sparse entry's holes are not looked at, its
// declared size is limited, and cancellation stops it however long it
// says it is.
func TestSparseEntries(t *testing.T) {
	tr := newTree(t)
	apply(t, tr, []entry{})
	if err := tr.Apply(context.Background(), bytes.NewReader(sparseLayer(t, "holey", 64<<20, 32<<20, "middle")), "sha256:s"); err != nil {
		t.Fatal(err)
	}
	in := tr.Lookup("holey").Inode()
	if in.Size != 64<<20 || in.Blocks() != 1 || len(in.Data()) != 1 || in.Data()[0].Offset != 32<<20 {
		t.Errorf("holey: size %d, %d blocks, runs %+v", in.Size, in.Blocks(), in.Data())
	}
	if got := content(t, tr, "holey"); got[32<<20:32<<20+6] != "middle" || strings.Trim(got[:32<<20], "\x00") != "" {
		t.Errorf("holey: content differs")
	}

	huge := sparseLayer(t, "huge", 256<<30, 0, "x")
	tr = newTree(t)
	tr.SetLimits(DefaultLimits())
	var le *LimitError
	if err := tr.Apply(context.Background(), bytes.NewReader(huge), "sha256:h"); !errors.As(err, &le) || le.Name != "file_size" {
		t.Errorf("256 GiB sparse file under the default limits: %v, want the file_size limit", err)
	}
	if err := Check(context.Background(), bytes.NewReader(huge), "sha256:h", DefaultLimits()); !errors.As(err, &le) {
		t.Errorf("Check: %v, want the file_size limit", err)
	}

	// The largest file ext4 holds, unlimited: only cancellation ends it.
	biggest := sparseLayer(t, "biggest", MaxFileSize, 0, "x")
	for _, run := range []func(context.Context) error{
		func(ctx context.Context) error { return newTree(t).Apply(ctx, bytes.NewReader(biggest), "sha256:b") },
		func(ctx context.Context) error { return Check(ctx, bytes.NewReader(biggest), "sha256:b", Limits{}) },
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := run(ctx)
		cancel()
		var ee *EntryError
		if !errors.Is(err, context.DeadlineExceeded) || !errors.As(err, &ee) || ee.Entry != "biggest" {
			t.Errorf("a 16 TiB sparse file past its deadline: %v, want the deadline, naming the entry", err)
		}
	}
	if err := newTree(t).Apply(context.Background(), bytes.NewReader(sparseLayer(t, "over", MaxFileSize+blockSize, 0, "x")), "sha256:o"); err == nil || !strings.Contains(err.Error(), "ext4 holds at most") {
		t.Errorf("a file past ext4's largest: %v", err)
	}
}

// TestSymlinkChain: a chain of symlinks, each target padded with "./",
// with thousands of entries below it, is resolved once, not once per
// entry.
func TestSymlinkChain(t *testing.T) {
	const links, entries = 39, 20000
	pad := strings.Repeat("./", 1000)
	chain := []entry{dir("real")}
	for i := 0; i < links; i++ {
		target := "real"
		if i > 0 {
			target = "l" + strconv.Itoa(i-1)
		}
		chain = append(chain, symlink("l"+strconv.Itoa(i), pad+target))
	}
	last := "l" + strconv.Itoa(links-1)
	l := chain
	for i := 0; i < entries; i++ {
		l = append(l, file(last+"/f"+strconv.Itoa(i), ""))
	}
	dir := t.TempDir()
	tr, err := New("", dir+"/data", time.Unix(0, 0)) // not staged: only resolving is measured
	if err != nil {
		t.Fatal(err)
	}
	apply(t, tr, l)
	if n := len(tr.Lookup("real").ChildNames()); n != entries {
		t.Fatalf("real holds %d entries, want %d", n, entries)
	}
	// Each entry walks its own two components; the chain, about 1000
	// components a link, is walked once.

	if limit := int64(4*entries + 2*links*1000); tr.walked > limit {
		t.Errorf("resolving took %d path components, want at most %d", tr.walked, limit)
	}
	// 41 links are too many, remembered or not.
	chain = append(chain, file(last+"/x", ""), symlink("l"+strconv.Itoa(links), last), symlink("l"+strconv.Itoa(links+1), "l"+strconv.Itoa(links)), file("l"+strconv.Itoa(links+1)+"/x", ""))
	if err := newTree(t).Apply(context.Background(), bytes.NewReader(layerTar(t, chain...)), "sha256:c"); err == nil || !strings.Contains(err.Error(), "too many levels of symlinks") {
		t.Errorf("41 symlinks: %v", err)
	}
}
