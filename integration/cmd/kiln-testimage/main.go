// Command kiln-testimage makes sample images for kiln's demo and
// benchmarks: an OCI image layout from Debian's static busybox, or from a
// debootstrap minbase tree (root only).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"

	"github.com/kilnfs/kiln/internal/dirtar"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kilnfs/kiln/integration/testimage"
)

func main() {
	kind := flag.String("image", "busybox", "busybox, minbase or minbase-systemd")
	out := flag.String("o", "", "OCI layout directory to write")
	tag := flag.String("tag", "latest", "tag of the image in the layout")
	flag.Parse()
	if *out == "" {
		fmt.Fprintln(os.Stderr, "usage: kiln-testimage -image busybox|minbase|minbase-systemd -o DIR [-tag TAG]")
		os.Exit(2)
	}
	if err := run(*kind, *out, *tag); err != nil {
		fmt.Fprintf(os.Stderr, "kiln-testimage: %v\n", err)
		os.Exit(1)
	}
}

func run(kind, out, tag string) error {
	var spec testimage.Image
	switch kind {
	case "busybox":
		dir, err := testimage.Busybox()
		if err != nil {
			return err
		}
		var buf bytes.Buffer
		if err := dirtar.Write(&buf, dir, dirtar.Options{}); err != nil {
			return err
		}
		spec = testimage.Image{
			Layers: []testimage.Layer{{Tar: buf.Bytes()}},
			Config: v1.Config{Cmd: []string{"/bin/busybox", "echo", "hello from kiln"}, Env: []string{"PATH=/bin"}},
		}
	case "minbase", "minbase-systemd":
		var extra []string
		if kind == "minbase-systemd" {
			extra = []string{"systemd-sysv", "udev"}
		}
		file, err := testimage.MinbaseTar(extra...)
		if err != nil {
			return err
		}
		spec = testimage.Image{
			Layers: []testimage.Layer{{File: file}},
			Config: v1.Config{Cmd: []string{"/bin/bash"}, Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}},
		}
	default:
		return fmt.Errorf("unknown image %q", kind)
	}
	img, err := testimage.Build(spec)
	if err != nil {
		return err
	}
	return testimage.WriteLayout(out, tag, img)
}
