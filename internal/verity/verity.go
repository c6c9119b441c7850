// Package verity appends a dm-verity hash tree to kiln's ext4 disks and
// describes it, so that a guest can mount its root read-only with every
// block checked against one root hash.
//
// The layout is veritysetup's with the hash device being the data device
// at an offset:
//
//	[0, DataSize)                   the ext4 filesystem, its size unchanged
//	[HashOffset, +4096)             the verity superblock (HashOffset is
//	                                DataSize rounded up to 4 KiB)
//	[HashOffset+4096, end)          the hash tree, top level first
//
// so `veritysetup verify DISK DISK ROOT --hash-offset=HashOffset` checks
// a disk, and the kernel's verity target takes it with HashStartBlock as
// its hash_start_block. Everything is derived from the disk and the
// build's identity: equal inputs give equal bytes.
package verity

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"

	dmverity "github.com/containerd/go-dmverity/pkg/verity"

	"github.com/kilnfs/kiln/internal/ext4"
)

// What kiln's trees use: the kernel's and veritysetup's defaults.
const (
	Algorithm = "sha256"
	BlockSize = 4096 // data and hash blocks
)

// Info is what a VMM or shim needs to set up the verity target of a disk.
type Info struct {
	// RootHash is the hex root hash: trust in it is trust in the disk.
	RootHash  string `json:"root_hash"`
	Algorithm string `json:"algorithm"`
	// Salt is hex, derived from the build's identity.
	Salt          string `json:"salt"`
	DataBlockSize int64  `json:"data_block_size"`
	HashBlockSize int64  `json:"hash_block_size"`
	// DataBlocks and DataSize are the filesystem's extent, in data blocks
	// and in bytes; the target's length is DataSize/512 sectors.
	DataBlocks int64 `json:"data_blocks"`
	DataSize   int64 `json:"data_size"`
	// HashOffset is where the verity superblock starts, in bytes
	// (veritysetup's --hash-offset).
	HashOffset int64 `json:"hash_offset"`
	// HashStartBlock is where the tree starts, in hash blocks from the
	// start of the disk (the verity table's hash_start_block).
	HashStartBlock int64 `json:"hash_start_block"`
	// UUID is the verity superblock's.
	UUID string `json:"uuid"`
}

// Table returns the device-mapper table of the verity target for the disk
// seen as dev in the guest (for dm-mod.create= or dmsetup).
func (i Info) Table(dev string) string {
	return fmt.Sprintf("0 %d verity 1 %s %s %d %d %d %d %s %s %s",
		i.DataSize/512, dev, dev, i.DataBlockSize, i.HashBlockSize, i.DataBlocks, i.HashStartBlock, i.Algorithm, i.RootHash, i.Salt)
}

// Labels returns the info as snapshot labels, prefix followed by the
// field's JSON name with dashes (root-hash, hash-offset, ...).
func (i Info) Labels(prefix string) map[string]string {
	n := func(v int64) string { return strconv.FormatInt(v, 10) }
	return map[string]string{
		prefix + "root-hash":        i.RootHash,
		prefix + "algorithm":        i.Algorithm,
		prefix + "salt":             i.Salt,
		prefix + "data-block-size":  n(i.DataBlockSize),
		prefix + "hash-block-size":  n(i.HashBlockSize),
		prefix + "data-blocks":      n(i.DataBlocks),
		prefix + "data-size":        n(i.DataSize),
		prefix + "hash-offset":      n(i.HashOffset),
		prefix + "hash-start-block": n(i.HashStartBlock),
		prefix + "uuid":             i.UUID,
	}
}

// Append writes the hash tree of the ext4 filesystem in the disk at path
// after the filesystem, replacing whatever followed it, and returns what
// the verity target needs. identity (the build's key) seeds the salt and
// the superblock's UUID. With sync it waits for the disk to reach
// stable storage.
func Append(path, identity string, sync bool) (Info, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return Info{}, err
	}
	info, err := AppendFile(f, identity, sync)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return info, err
}

// AppendFile is Append for a disk open for reading and writing, which
// may have no name yet.
func AppendFile(f *os.File, identity string, sync bool) (Info, error) {
	dataSize, err := filesystemSize(f)
	if err != nil {
		return Info{}, err
	}
	info := layout(dataSize, identity)
	// Drop a tree an earlier Append wrote: the new one may be shorter.
	if err := f.Truncate(info.HashOffset); err != nil {
		return Info{}, err
	}
	// go-dmverity opens the disk by name; this one names f whether or
	// not it has a name of its own.
	path := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	p := info.params()
	root, err := dmverity.Create(&p, path, path)
	if err != nil {
		return Info{}, fmt.Errorf("dm-verity hash tree of %s: %w", f.Name(), err)
	}
	info.RootHash = hex.EncodeToString(root)
	if sync {
		if err := f.Sync(); err != nil {
			return Info{}, err
		}
	}
	return info, nil
}

// Describe reads the verity parameters of a disk Append wrote. The root
// hash comes from the tree's top block, unchecked: Describe is for the
// disks kiln made itself; veritysetup or the kernel check the rest.
func Describe(path string) (Info, error) {
	f, err := os.Open(path)
	if err != nil {
		return Info{}, err
	}
	defer f.Close()
	dataSize, err := filesystemSize(f)
	if err != nil {
		return Info{}, err
	}
	info := Info{DataSize: dataSize, HashOffset: alignUp(dataSize)}
	sb, err := dmverity.ReadSuperblock(f, uint64(info.HashOffset))
	if err != nil {
		return Info{}, fmt.Errorf("%s has no dm-verity hash tree after its filesystem: %w", path, err)
	}
	info.Algorithm = string(trimNul(sb.Algorithm[:]))
	info.Salt = hex.EncodeToString(sb.Salt[:sb.SaltSize])
	info.DataBlockSize, info.HashBlockSize = int64(sb.DataBlockSize), int64(sb.HashBlockSize)
	info.DataBlocks = int64(sb.DataBlocks)
	info.HashStartBlock = (info.HashOffset + info.HashBlockSize) / info.HashBlockSize
	if info.UUID, err = sb.UUIDString(); err != nil {
		return Info{}, err
	}
	if info.Algorithm != Algorithm || info.DataBlockSize != BlockSize || info.HashBlockSize != BlockSize || info.DataBlocks*BlockSize != dataSize {
		return Info{}, fmt.Errorf("%s: dm-verity superblock (%s, %d blocks of %d) is not one kiln writes", path, info.Algorithm, info.DataBlocks, info.DataBlockSize)
	}
	// The top level is one block, first in the tree; with a single data
	// block there is no tree and the root is that block's hash.
	top := make([]byte, BlockSize)
	at := info.HashStartBlock * BlockSize
	if info.DataBlocks == 1 {
		at = 0
	}
	if _, err := f.ReadAt(top, at); err != nil {
		return Info{}, fmt.Errorf("%s: reading the dm-verity tree: %w", path, err)
	}
	h := sha256.New()
	h.Write(sb.Salt[:sb.SaltSize])
	h.Write(top)
	info.RootHash = hex.EncodeToString(h.Sum(nil))
	return info, nil
}

// Check verifies the whole disk f against rootHash: its hash tree must
// be the one Append would write for identity (salt, UUID, layout), and
// every data block must hash up to rootHash. It is for disks kiln did
// not write itself, such as one downloaded from a registry.
func Check(f *os.File, identity, rootHash string) error {
	path := fmt.Sprintf("/proc/self/fd/%d", f.Fd())
	got, err := Describe(path)
	if err != nil {
		return err
	}
	want := layout(got.DataSize, identity)
	want.RootHash = rootHash
	if got != want {
		return fmt.Errorf("the dm-verity tree is not the one kiln writes for this build: it has %+v, kiln's would have %+v", got, want)
	}
	root, err := hex.DecodeString(rootHash)
	if err != nil {
		return fmt.Errorf("root hash %q: %w", rootHash, err)
	}
	p := want.params()
	if err := dmverity.Verify(&p, path, path, root); err != nil {
		return fmt.Errorf("dm-verity: %w", err)
	}
	return nil
}

// layout is everything but the root hash for a filesystem of dataSize
// bytes and a build's identity.
func layout(dataSize int64, identity string) Info {
	salt := sha256.Sum256([]byte("kiln.verity-salt\x00" + identity))
	off := alignUp(dataSize)
	return Info{
		Algorithm:      Algorithm,
		Salt:           hex.EncodeToString(salt[:]),
		DataBlockSize:  BlockSize,
		HashBlockSize:  BlockSize,
		DataBlocks:     dataSize / BlockSize,
		DataSize:       dataSize,
		HashOffset:     off,
		HashStartBlock: off/BlockSize + 1,
		UUID:           ext4.DeriveUUID("kiln.verity-uuid", identity),
	}
}

func (i Info) params() dmverity.Params {
	salt, _ := hex.DecodeString(i.Salt)
	p := dmverity.DefaultParams()
	p.DataBlockSize, p.HashBlockSize = BlockSize, BlockSize
	p.DataBlocks = uint64(i.DataBlocks)
	p.Salt, p.SaltSize = salt, uint16(len(salt))
	// With the data device as hash device, Create writes the superblock
	// here and the tree one hash block later.
	p.HashAreaOffset = uint64(i.HashOffset)
	u, _ := hex.DecodeString(strings.ReplaceAll(i.UUID, "-", ""))
	copy(p.UUID[:], u)
	return p
}

// filesystemSize reads the size of the ext4 filesystem at the start of
// the disk f from its superblock: the disk may be longer.
func filesystemSize(f *os.File) (int64, error) {
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		return 0, fmt.Errorf("%s: reading the ext4 superblock: %w", f.Name(), err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != 0xEF53 {
		return 0, fmt.Errorf("%s: not an ext4 filesystem", f.Name())
	}
	blocks := uint64(le.Uint32(sb[0x4:]))
	if le.Uint32(sb[0x60:])&0x80 != 0 { // 64bit
		blocks |= uint64(le.Uint32(sb[0x150:])) << 32
	}
	size := blocks << (10 + le.Uint32(sb[0x18:]))
	if size == 0 || size%BlockSize != 0 || size > 1<<62 {
		return 0, fmt.Errorf("%s: ext4 filesystem of %d bytes: not whole 4 KiB blocks", f.Name(), size)
	}
	return int64(size), nil
}

func alignUp(n int64) int64 { return (n + BlockSize - 1) / BlockSize * BlockSize }

func trimNul(b []byte) []byte {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		return b[:i]
	}
	return b
}
