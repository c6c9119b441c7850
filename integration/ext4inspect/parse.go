package ext4inspect

import (
	"encoding/hex"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// This file holds the parsers for debugfs output. They only interpret
// text; running debugfs is inspect.go's job.

// dirEntry is one record of `ls -p`.
type dirEntry struct {
	Ino  uint32
	Mode uint32 // i_mode: type and permission bits
	UID  uint32
	GID  uint32
	Name string
	Size int64 // -1 for directories, which ls -p prints without a size
}

// lsRecord matches one `ls -p` record: /ino/mode/uid/gid/name/size/ and a
// newline. Names cannot contain '/', so [^/]* never overruns the name
// field, and it does match newlines, which ls -p prints raw.
var lsRecord = regexp.MustCompile(`\A/(\d+)/([0-7]+)/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/\n`)

// parseLs parses the output of one `ls -p` command. "." and "..", and the
// empty records debugfs shows for unused directory space, are dropped.
func parseLs(out string) ([]dirEntry, error) {
	var ents []dirEntry
	for len(out) > 0 {
		if out[0] == '\n' { // ls -p ends its listing with an empty line
			out = out[1:]
			continue
		}
		m := lsRecord.FindStringSubmatch(out)
		if m == nil {
			return nil, fmt.Errorf("ls -p: unexpected output at %.80q", out)
		}
		out = out[len(m[0]):]
		ino, err := strconv.ParseUint(m[1], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("ls -p: inode %q: %w", m[1], err)
		}
		mode, err := strconv.ParseUint(m[2], 8, 32)
		if err != nil {
			return nil, fmt.Errorf("ls -p: mode %q: %w", m[2], err)
		}
		uid, err := parseID(m[3])
		if err != nil {
			return nil, fmt.Errorf("ls -p: uid: %w", err)
		}
		gid, err := parseID(m[4])
		if err != nil {
			return nil, fmt.Errorf("ls -p: gid: %w", err)
		}
		size := int64(-1)
		if m[6] != "" {
			if size, err = strconv.ParseInt(m[6], 10, 64); err != nil {
				return nil, fmt.Errorf("ls -p: size %q: %w", m[6], err)
			}
		}
		if m[5] == "." || m[5] == ".." || ino == 0 {
			continue // ino 0: the unused space of an empty directory block
		}
		ents = append(ents, dirEntry{Ino: uint32(ino), Mode: uint32(mode), UID: uid, GID: gid, Name: m[5], Size: size})
	}
	return ents, nil
}

// parseID reads a uid or gid. debugfs prints the 32-bit id with %d, so ids
// of 2^31 and above come out negative.
func parseID(s string) (uint32, error) {
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, err
	}
	if v < -(1<<31) || v > 1<<32-1 {
		return 0, fmt.Errorf("id %d out of range", v)
	}
	return uint32(v), nil
}

// inodeStat is what `stat <N>` says about an inode.
type inodeStat struct {
	Ino       uint32
	Type      Type
	Mode      uint32 // permission bits (07777)
	Flags     uint32
	UID, GID  uint32
	Size      int64
	FileACL   uint64
	Links     uint32
	Blocks    int64 // i_blocks as printed ("Blockcount")
	Atime     time.Time
	Mtime     time.Time
	Ctime     time.Time
	Major     uint32
	Minor     uint32
	HasDevice bool
	// FastLink is set for symlinks whose target is stored in the inode;
	// Target is then the target.
	FastLink bool
	Target   string
	// Xattrs holds the values debugfs printed; LongXattrs names those
	// whose values it left out (40 bytes and more), with their lengths.
	Xattrs     map[string][]byte
	LongXattrs map[string]int
}

var (
	reInode   = regexp.MustCompile(`(?m)^Inode: (\d+)\s+Type: ([a-zA-Z ]+?)\s+Mode:\s+([0-7]+)\s+Flags: 0x([0-9a-fA-F]+)`)
	reUser    = regexp.MustCompile(`(?m)^User:\s*(-?\d+)\s+Group:\s*(-?\d+)(?:\s+Project:\s*-?\d+)?\s+Size:\s*(\d+)`)
	reACL     = regexp.MustCompile(`(?m)^File ACL: (\d+)`)
	reLinks   = regexp.MustCompile(`(?m)^Links: (\d+)\s+Blockcount: (\d+)`)
	reTime    = regexp.MustCompile(`(?m)^ ?(a|m|c|cr)time: 0x([0-9a-fA-F]{1,8})(?::([0-9a-fA-F]{1,8}))? --`)
	reDevice  = regexp.MustCompile(`(?m)^(?:\(New-style\) )?Device major/minor number: (\d+):(\d+)`)
	reXattrHd = "\nExtended attributes:\n"
	fastLink  = "\nFast link dest: \""
)

var typeNames = map[string]Type{
	"regular":           Regular,
	"directory":         Dir,
	"symlink":           Symlink,
	"FIFO":              Fifo,
	"character special": CharDev,
	"block special":     BlockDev,
	"socket":            Socket,
}

// huge_file inodes count i_blocks in filesystem blocks, not sectors.
const hugeFileFlag = 0x40000

// parseStat parses the output of one `stat <N>` command.
func parseStat(out string) (*inodeStat, error) {
	out = "\n" + out
	st := &inodeStat{}
	// A fast symlink's target is printed raw, last: take it by the size
	// the inode reports, and parse the fields only from what precedes it.
	head := out
	linkAt := strings.Index(out, fastLink)
	if linkAt >= 0 {
		head = out[:linkAt]
	}
	m := reInode.FindStringSubmatch(head)
	if m == nil {
		return nil, fmt.Errorf("stat: no Inode line in %.200q", out)
	}
	ino, _ := strconv.ParseUint(m[1], 10, 32)
	st.Ino = uint32(ino)
	t, ok := typeNames[m[2]]
	if !ok {
		return nil, fmt.Errorf("stat: inode %d has type %q", ino, m[2])
	}
	st.Type = t
	mode, _ := strconv.ParseUint(m[3], 8, 32)
	st.Mode = uint32(mode) & 0o7777
	flags, _ := strconv.ParseUint(m[4], 16, 32)
	st.Flags = uint32(flags)

	if m = reUser.FindStringSubmatch(head); m == nil {
		return nil, fmt.Errorf("stat: inode %d: no User line", ino)
	}
	var err error
	if st.UID, err = parseID(m[1]); err != nil {
		return nil, fmt.Errorf("stat: inode %d: uid: %w", ino, err)
	}
	if st.GID, err = parseID(m[2]); err != nil {
		return nil, fmt.Errorf("stat: inode %d: gid: %w", ino, err)
	}
	if st.Size, err = strconv.ParseInt(m[3], 10, 64); err != nil {
		return nil, fmt.Errorf("stat: inode %d: size: %w", ino, err)
	}
	if m = reACL.FindStringSubmatch(head); m != nil {
		st.FileACL, _ = strconv.ParseUint(m[1], 10, 64)
	}
	if m = reLinks.FindStringSubmatch(head); m == nil {
		return nil, fmt.Errorf("stat: inode %d: no Links line", ino)
	}
	links, _ := strconv.ParseUint(m[1], 10, 32)
	st.Links = uint32(links)
	st.Blocks, _ = strconv.ParseInt(m[2], 10, 64)

	seen := map[string]bool{}
	for _, m := range reTime.FindAllStringSubmatch(head, -1) {
		lo, _ := strconv.ParseUint(m[2], 16, 32)
		var extra uint64
		if m[3] != "" {
			extra, _ = strconv.ParseUint(m[3], 16, 32)
		}
		tm := DecodeTime(uint32(lo), uint32(extra))
		switch m[1] {
		case "a":
			st.Atime = tm
		case "m":
			st.Mtime = tm
		case "c":
			st.Ctime = tm
		}
		seen[m[1]] = true
	}
	if !seen["a"] || !seen["m"] || !seen["c"] {
		return nil, fmt.Errorf("stat: inode %d: missing timestamps", ino)
	}
	if m = reDevice.FindStringSubmatch(head); m != nil {
		maj, _ := strconv.ParseUint(m[1], 10, 32)
		min, _ := strconv.ParseUint(m[2], 10, 32)
		st.Major, st.Minor, st.HasDevice = uint32(maj), uint32(min), true
	}
	if i := strings.Index(head, reXattrHd); i >= 0 {
		if st.Xattrs, st.LongXattrs, err = parseXattrs(head[i+len(reXattrHd):]); err != nil {
			return nil, fmt.Errorf("stat: inode %d: %w", ino, err)
		}
	}
	if linkAt >= 0 {
		rest := out[linkAt+len(fastLink):]
		if int64(len(rest)) < st.Size+1 || rest[st.Size] != '"' {
			return nil, fmt.Errorf("stat: inode %d: fast link target shorter than its size %d", ino, st.Size)
		}
		st.FastLink, st.Target = true, rest[:st.Size]
	}
	return st, nil
}

// DecodeTime turns an ext4 timestamp, the 32-bit seconds field and the
// extra field (nanoseconds << 2 | epoch bits), into a time. The seconds
// field is signed; the epoch bits extend it by multiples of 2^32, which
// carries times from 1901 to 2446.
func DecodeTime(lo, extra uint32) time.Time {
	sec := int64(int32(lo)) + int64(extra&3)<<32
	return time.Unix(sec, int64(extra>>2))
}

// xattrLine is one attribute line of stat or ea_list:
//
//	NAME (LEN)              value left out (LEN 0, or LEN >= 40 in stat)
//	NAME (LEN) = "c string" printable value, C escapes
//	NAME (LEN) = 01 02 ff   other values, hex bytes each followed by a space
var xattrSplit = regexp.MustCompile(` \((\d+)\)(?: = |$)`)

// parseXattrs parses the indented lines that follow "Extended attributes:".
func parseXattrs(s string) (vals map[string][]byte, long map[string]int, err error) {
	for _, line := range strings.Split(s, "\n") {
		if !strings.HasPrefix(line, "  ") {
			break
		}
		line = line[2:]
		name, val, n, complete, ok := splitXattr(line)
		if !ok {
			return nil, nil, fmt.Errorf("unparsable attribute line %q", line)
		}
		if !complete {
			if long == nil {
				long = map[string]int{}
			}
			long[name] = n
			continue
		}
		if vals == nil {
			vals = map[string][]byte{}
		}
		vals[name] = val
	}
	return vals, long, nil
}

// splitXattr finds where the name of an attribute line ends: the first
// " (LEN)" after which the rest decodes to exactly LEN bytes.
func splitXattr(line string) (name string, val []byte, n int, complete, ok bool) {
	for _, loc := range xattrSplit.FindAllStringSubmatchIndex(line, -1) {
		rawName := line[:loc[0]]
		n, err := strconv.Atoi(line[loc[2]:loc[3]])
		if err != nil {
			continue
		}
		nm, ok := decodeXattrName(rawName)
		if !ok {
			continue
		}
		rest := line[loc[1]:]
		if !strings.HasSuffix(line[:loc[1]], " = ") {
			if loc[1] != len(line) {
				continue
			}
			if n == 0 {
				return nm, []byte{}, 0, true, true
			}
			return nm, nil, n, false, true
		}
		v, ok := decodeXattrValue(rest)
		if !ok || len(v) != n {
			continue
		}
		return nm, v, n, true, true
	}
	return "", nil, 0, false, false
}

var hexBytes = regexp.MustCompile(`\A(?:[0-9a-f]{2} )+\z`)

// decodeXattrName undoes debugfs's printing of a name: C escapes, or hex
// bytes when the name is mostly unprintable.
func decodeXattrName(s string) (string, bool) {
	if hexBytes.MatchString(s) {
		b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
		if err == nil {
			return string(b), true
		}
	}
	b, ok := unescapeC(s)
	return string(b), ok
}

func decodeXattrValue(s string) ([]byte, bool) {
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		return unescapeC(s[1 : len(s)-1])
	}
	if hexBytes.MatchString(s) {
		b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
		return b, err == nil
	}
	return nil, false
}

// unescapeC reverses e2fsprogs' print_c_string.
func unescapeC(s string) ([]byte, bool) {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' {
			out = append(out, c)
			continue
		}
		i++
		if i >= len(s) {
			return nil, false
		}
		switch s[i] {
		case 'a':
			out = append(out, '\a')
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 't':
			out = append(out, '\t')
		case 'v':
			out = append(out, '\v')
		case '\\', '\'', '"':
			out = append(out, s[i])
		default:
			if i+3 > len(s) {
				return nil, false
			}
			v, err := strconv.ParseUint(s[i:i+3], 8, 8)
			if err != nil {
				return nil, false
			}
			out = append(out, byte(v))
			i += 2
		}
	}
	return out, true
}

// parseSuper reads block size and count from `stats -h`.
func parseSuper(out string) (blockSize, blockCount int64, err error) {
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Block size":
			blockSize, err = strconv.ParseInt(v, 10, 64)
		case "Block count":
			blockCount, err = strconv.ParseInt(v, 10, 64)
		}
		if err != nil {
			return 0, 0, fmt.Errorf("stats: %s: %w", k, err)
		}
	}
	if blockSize == 0 || blockCount == 0 {
		return 0, 0, fmt.Errorf("stats: no block size or count in %.200q", out)
	}
	return blockSize, blockCount, nil
}

// splitSections cuts the stdout of a debugfs -f run into the output of
// each command, found by the "debugfs: CMD" line debugfs echoes before
// running it.
func splitSections(stdout string, cmds []string) ([]string, error) {
	out := "\n" + stdout
	starts := make([]int, len(cmds)) // where each command's output starts
	ends := make([]int, len(cmds))   // where its echo line starts
	pos := 0
	for i, c := range cmds {
		marker := "\ndebugfs: " + c + "\n"
		j := strings.Index(out[pos:], marker)
		if j < 0 {
			return nil, fmt.Errorf("debugfs output lacks the echo of command %d %q", i, c)
		}
		ends[i] = pos + j
		starts[i] = pos + j + len(marker)
		// A command without output is followed directly by the next
		// echo, whose leading newline is this marker's last byte.
		pos = starts[i] - 1
	}
	secs := make([]string, len(cmds))
	for i := range cmds {
		end := len(out)
		if i+1 < len(cmds) {
			end = ends[i+1] + 1 // keep the output's final newline
		}
		secs[i] = out[starts[i]:end]
	}
	return secs, nil
}
