package initramfs

import (
	"fmt"
	"io"
)

// File types and permissions in a cpio mode, as in stat(2).
const (
	modeDir     = 0o040000
	modeRegular = 0o100000
	modeCharDev = 0o020000
)

// newcMagic starts every header of the "new ASCII" cpio format, the one
// the kernel unpacks.
const newcMagic = "070701"

const trailer = "TRAILER!!!"

// cpioWriter writes a newc cpio archive. Entries are owned by root and
// dated 1970, so the same input always gives the same bytes. The first
// error sticks and is returned by close.
type cpioWriter struct {
	w   io.Writer
	ino uint32
	off int64
	err error
}

func (c *cpioWriter) dir(name string, perm uint32) {
	c.entry(name, modeDir|perm, 2, 0, 0, nil, 0)
}

func (c *cpioWriter) file(name string, perm uint32, data io.Reader, size int64) {
	c.entry(name, modeRegular|perm, 1, 0, 0, data, size)
}

func (c *cpioWriter) charDev(name string, perm, major, minor uint32) {
	c.entry(name, modeCharDev|perm, 1, major, minor, nil, 0)
}

// close writes the trailer that ends the archive.
func (c *cpioWriter) close() error {
	c.ino = 0
	c.entry(trailer, 0, 1, 0, 0, nil, 0)
	return c.err
}

// entry writes a header with fields as 8 hex digits, the name with its NUL
// padded to 4 bytes, and the data padded likewise.
func (c *cpioWriter) entry(name string, mode, nlink, rdevMajor, rdevMinor uint32, data io.Reader, size int64) {
	if c.err != nil {
		return
	}
	if size > 0xffffffff {
		c.err = fmt.Errorf("cpio: %s is too large (%d bytes)", name, size)
		return
	}
	ino := uint32(0)
	if name != trailer {
		c.ino++
		ino = c.ino
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		newcMagic, ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(hdr + name + "\x00"))
	c.pad()
	if data != nil && c.err == nil {
		n, err := io.CopyN(c.w, data, size)
		c.off += n
		if err != nil {
			c.err = fmt.Errorf("cpio: %s: %w", name, err)
			return
		}
	}
	c.pad()
}

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.off += int64(n)
	if err != nil {
		c.err = fmt.Errorf("cpio: %w", err)
	}
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}
