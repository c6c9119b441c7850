package ext4

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kilnfs/kiln/internal/fstree"
	"github.com/kilnfs/kiln/internal/testenv"
)

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		`plain`:            `"plain"`,
		`with space`:       `"with space"`,
		`a"b`:              `"a""b"`,
		`back\slash`:       `"back\slash"`,
		`"; sif <2> uid 1`: `"""; sif <2> uid 1"`,
	} {
		got, err := quote(in)
		if err != nil || got != want {
			t.Errorf("quote(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"a\nb", "a\rb", "a\x00b"} {
		if _, err := quote(bad); err == nil {
			t.Errorf("quote(%q) should fail", bad)
		}
	}
}

func TestEncodeTime(t *testing.T) {
	cases := []struct {
		t         time.Time
		lo, extra uint32
	}{
		{time.Unix(0, 0), 0, 0},
		{time.Unix(-5, 0), 0xfffffffb, 0},
		{time.Unix(1<<31, 0), 0x80000000, 1},                                // 2038-01-19
		{time.Unix(1<<32, 10), 0, 10<<2 | 1},                                // 2106
		{time.Unix(4102444800, 999999999), 0xf4865700, 999999999<<2 | 1},    // 2100
		{time.Unix(-1<<40, 0), 0x80000000, 0},                               // clamped to 1901
		{time.Unix(-1, 5e8), 0xffffffff, 5e8 << 2},                          // 1969-12-31T23:59:59.5
		{time.Unix(gapLow, 7), 0x7fffffff, 7<<2 | 2},                        // 2310-04-04, the last second before the gap
		{time.Unix(gapLow+1, 7), 0x7fffffff, 2},                             // in the gap: the second before it
		{time.Date(2345, 1, 1, 0, 0, 0, 0, time.UTC), 0x7fffffff, 2},        // in the gap
		{time.Unix(gapHigh-1, 7), 0x7fffffff, 2},                            // 2378-04-22, in the gap
		{time.Unix(gapHigh, 7), 0, 7<<2 | 3},                                // 2378-04-22, after it
		{time.Date(2400, 1, 1, 0, 0, 0, 9, time.UTC), 0x28cd9d00, 9<<2 | 3}, // 2400
		{time.Unix(maxTime, 9), 0x7fffffff, 9<<2 | 3},                       // 2446-05-10T22:38:55
		{time.Unix(maxTime+1, 9), 0x7fffffff, 3},                            // clamped to 2446
		{time.Unix(1<<40, 0), 0x7fffffff, 3},
	}
	for _, c := range cases {
		lo, extra := EncodeTime(c.t)
		if lo != c.lo || extra != c.extra {
			t.Errorf("EncodeTime(%s) = %#x %#x, want %#x %#x", c.t.UTC(), lo, extra, c.lo, c.extra)
		}
		// The kernel's decoding must give the time back.
		sec := int64(int32(lo)) + int64(extra&3)<<32
		exact := c.t.Unix() >= minTime && c.t.Unix() <= maxTime && (c.t.Unix() <= gapLow || c.t.Unix() >= gapHigh)
		if exact && (sec != c.t.Unix() || int(extra>>2) != c.t.Nanosecond()) {
			t.Errorf("decode(%#x, %#x) = %d.%d, want %d.%d", lo, extra, sec, extra>>2, c.t.Unix(), c.t.Nanosecond())
		}
		// Nothing kiln stores looks like e2fsck's mis-encoded pre-1970
		// time: the sign bit with both epoch bits set.
		if lo&(1<<31) != 0 && extra&3 == 3 {
			t.Errorf("EncodeTime(%s) = %#x %#x: e2fsck would take it for a time before 1970", c.t.UTC(), lo, extra)
		}
	}
}

func needTools(t *testing.T) {
	for _, tool := range []string{"mke2fs", "debugfs", "e2fsck", "tune2fs"} {
		if _, err := exec.LookPath(tool); err != nil {
			testenv.Unavailable(t, "%s not installed (e2fsprogs): %v", tool, err)
		}
	}
}

// newTree returns a work directory and an empty tree staged in it.
func newTree(t *testing.T) (string, *fstree.Tree) {
	t.Helper()
	work := t.TempDir()
	stage := filepath.Join(work, "stage")
	if err := os.Mkdir(stage, 0o700); err != nil {
		t.Fatal(err)
	}
	tree, err := fstree.New(stage, filepath.Join(work, "stage.data"), time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	return work, tree
}

// TestBuildRestoresMetadata builds a small tree and reads it back with
// debugfs: what the staging directory could not hold must be in the image.
func TestBuildRestoresMetadata(t *testing.T) {
	needTools(t)
	work, tree := newTree(t)
	odd := `dev "quoted" name; sif <2> uid 7`
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mt := time.Unix(4102444800, 123456789) // 2100
	hdrs := []*tar.Header{
		{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(1000, 0)},
		{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mt},
		{Name: "bin/ping", Typeflag: tar.TypeReg, Mode: 0o4711, Uid: 100000, Gid: 4000000000, ModTime: mt, Size: 4,
			PAXRecords: map[string]string{"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
		{Name: "dev/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mt},
		{Name: "dev/" + odd, Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 259, Devminor: 65536, ModTime: mt},
		{Name: "dev/link", Typeflag: tar.TypeLink, Linkname: "dev/" + odd},
		{Name: "old", Typeflag: tar.TypeReg, Mode: 0o600, ModTime: time.Unix(-86400, 0)},
	}
	for _, h := range hdrs {
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			tw.Write([]byte("ping"))
		}
	}
	tw.Close()
	if err := tree.Apply(context.Background(), &buf, "test"); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(work, "out.ext4")
	if _, err := Build(context.Background(), tree, img, Options{Identity: "test", WorkDir: work}); err != nil {
		t.Fatal(err)
	}
	if err := Check(context.Background(), img); err != nil {
		t.Fatal(err)
	}
	stat := func(path string) string {
		out, err := exec.Command("debugfs", "-R", "stat "+path, img).CombinedOutput()
		if err != nil {
			t.Fatalf("debugfs: %v", err)
		}
		return string(out)
	}
	ping := stat("/bin/ping")
	for _, want := range []string{"Mode:  04711", "User: 100000", "Group: -294967296", // debugfs prints ids as signed 32-bit
		"mtime: 0xf4865700:1d6f3455"} {
		if !strings.Contains(ping, want) {
			t.Errorf("/bin/ping lacks %q:\n%s", want, ping)
		}
	}
	if !strings.Contains(ping, "security.capability") {
		t.Errorf("/bin/ping lacks its capability xattr:\n%s", ping)
	}
	dev := stat(`"/dev/` + strings.ReplaceAll(odd, `"`, `""`) + `"`)
	for _, want := range []string{"Type: character special", "Mode:  0666", "Links: 2", "Device major/minor number: 259:65536"} {
		if !strings.Contains(dev, want) {
			t.Errorf("device lacks %q:\n%s", want, dev)
		}
	}
	if root := stat("/"); !strings.Contains(root, "User:     0") || !strings.Contains(root, "mtime: 0x000003e8:00000000") {
		t.Errorf("root not restored:\n%s", root)
	}
	if old := stat("/old"); !strings.Contains(old, "mtime: 0xfffeae80:00000000") {
		t.Errorf("pre-1970 mtime lost:\n%s", old)
	}
}

// TestBuildPlacesContent builds files whose data runs make one to six
// extents (past four the inode holds an extent tree of depth one), with
// holes between them, and reads every file back.
func TestBuildPlacesContent(t *testing.T) {
	needTools(t)
	work, tree := newTree(t)
	want := map[string][]byte{
		"empty": nil,
		"small": []byte("hello"),
		"tail":  bytes.Repeat([]byte("x"), 3*BlockSize+17),
	}
	for runs := 1; runs <= 6; runs++ {
		// runs blocks of data, each followed by two blocks of zeros,
		// the last one cut short.
		var b []byte
		for i := 0; i < runs; i++ {
			b = append(b, bytes.Repeat([]byte{byte('a' + i)}, BlockSize)...)
			b = append(b, make([]byte, 2*BlockSize)...)
		}
		want[fmt.Sprintf("runs%d", runs)] = b[:len(b)-BlockSize-1]
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, data := range want {
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data)), ModTime: time.Unix(1, 0)})
		tw.Write(data)
	}
	tw.Close()
	if err := tree.Apply(context.Background(), &buf, "test"); err != nil {
		t.Fatal(err)
	}
	for _, noSync := range []bool{false, true} {
		img := filepath.Join(work, fmt.Sprintf("out-%v.ext4", noSync))
		if _, err := Build(context.Background(), tree, img, Options{Identity: "test", WorkDir: work, NoSync: noSync}); err != nil {
			t.Fatal(err)
		}
		if err := Check(context.Background(), img); err != nil {
			t.Fatal(err)
		}
		for name, data := range want {
			dump := filepath.Join(work, "dump")
			if out, err := exec.Command("debugfs", "-R", "dump /"+name+" "+dump, img).CombinedOutput(); err != nil {
				t.Fatalf("debugfs: %v\n%s", err, out)
			}
			got, err := os.ReadFile(dump)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("noSync=%v: /%s reads back %d bytes that differ from its %d", noSync, name, len(got), len(data))
			}
			os.Remove(dump)
		}
		stat, _ := exec.Command("debugfs", "-R", "stat /runs6", img).CombinedOutput()
		if !strings.Contains(string(stat), "(ETB0)") || strings.Contains(string(stat), "[u]") {
			t.Errorf("/runs6 should have an extent tree of depth one, every extent written:\n%s", stat)
		}
	}
	a, _ := os.ReadFile(filepath.Join(work, "out-false.ext4"))
	b, _ := os.ReadFile(filepath.Join(work, "out-true.ext4"))
	if !bytes.Equal(a, b) {
		t.Errorf("NoSync changed the bytes of the image")
	}
}
