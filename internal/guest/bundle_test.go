package guest

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParsePieces(t *testing.T) {
	for in, want := range map[string][]Piece{
		"init,agent,network":   {PieceInit, PieceAgent, PieceNetwork},
		" Agent , init,,agent": {PieceAgent, PieceInit},
		"network":              {PieceNetwork},
		"":                     nil,
	} {
		got, err := ParsePieces(in)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("ParsePieces(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	_, err := ParsePieces("init,bogus,agent,sshd")
	if err == nil {
		t.Fatal("unknown pieces accepted")
	}
	for _, want := range []string{`"bogus"`, `"sshd"`, "init, agent, network"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}

// writeELF writes a minimal x86-64 ELF executable, dynamically linked when
// interp is not empty.
func writeELF(t *testing.T, path string, typ elf.Type, interp string) {
	t.Helper()
	const ehsize, phsize = 64, 56
	var progs []elf.Prog64
	if interp != "" {
		progs = append(progs, elf.Prog64{Type: uint32(elf.PT_INTERP), Flags: uint32(elf.PF_R),
			Off: ehsize + 2*phsize, Filesz: uint64(len(interp) + 1), Memsz: uint64(len(interp) + 1), Align: 1})
	}
	progs = append(progs, elf.Prog64{Type: uint32(elf.PT_LOAD), Flags: uint32(elf.PF_R | elf.PF_X),
		Vaddr: 0x400000, Paddr: 0x400000, Filesz: 0x100, Memsz: 0x100, Align: 0x1000})
	hdr := elf.Header64{
		Type: uint16(typ), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Entry: 0x400000, Phoff: ehsize, Ehsize: ehsize, Phentsize: phsize, Phnum: uint16(len(progs)),
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	var buf bytes.Buffer
	binary.Write(&buf, binary.LittleEndian, hdr)
	for _, p := range progs {
		binary.Write(&buf, binary.LittleEndian, p)
	}
	for buf.Len() < ehsize+2*phsize {
		buf.WriteByte(0)
	}
	buf.WriteString(interp)
	buf.Write(make([]byte, 0x100))
	if err := os.WriteFile(path, buf.Bytes(), 0o755); err != nil {
		t.Fatal(err)
	}
}

// binDir returns a directory with static stand-ins for both guest binaries.
func binDir(t *testing.T) string {
	dir := t.TempDir()
	writeELF(t, filepath.Join(dir, InitBinary), elf.ET_EXEC, "")
	writeELF(t, filepath.Join(dir, AgentBinary), elf.ET_EXEC, "")
	return dir
}

const testConfig = `{"config":{"Cmd":["/bin/sh"]}}`

type fileSummary struct {
	kind   string // dir, symlink, source, data
	mode   uint32
	target string
}

func summarize(t *testing.T, files []File) (map[string]fileSummary, []string) {
	t.Helper()
	m := map[string]fileSummary{}
	var order []string
	for _, f := range files {
		if f.UID != 0 || f.GID != 0 {
			t.Errorf("%s is owned by %d:%d, want root", f.Path, f.UID, f.GID)
		}
		s := fileSummary{mode: f.Mode}
		set := 0
		if f.Dir {
			s.kind, set = "dir", set+1
		}
		if f.Symlink != "" {
			s.kind, s.target, set = "symlink", f.Symlink, set+1
		}
		if f.Source != "" {
			s.kind, s.target, set = "source", filepath.Base(f.Source), set+1
		}
		if f.Data != nil {
			s.kind, set = "data", set+1
		}
		if set != 1 {
			t.Errorf("%s has %d kinds of content, want exactly one", f.Path, set)
		}
		if _, dup := m[f.Path]; dup {
			t.Errorf("%s listed twice", f.Path)
		}
		m[f.Path] = s
		order = append(order, f.Path)
	}
	return m, order
}

func TestBundleInitOnly(t *testing.T) {
	files, err := Bundle([]Piece{PieceInit}, binDir(t), false)
	if err != nil {
		t.Fatal(err)
	}
	got, order := summarize(t, files)
	want := map[string]fileSummary{
		"/.kiln":                   {kind: "dir", mode: 0o755},
		"/.kiln/image-config.json": {kind: "data", mode: 0o644},
		"/.kiln/init":              {kind: "source", mode: 0o755, target: InitBinary},
		"/dev":                     {kind: "dir", mode: 0o755},
		"/proc":                    {kind: "dir", mode: 0o555},
		"/run":                     {kind: "dir", mode: 0o755},
		"/sys":                     {kind: "dir", mode: 0o555},
		"/tmp":                     {kind: "dir", mode: 0o1777},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("files = %+v\nwant %+v", got, want)
	}
	wantOrder := []string{"/.kiln", "/.kiln/image-config.json", "/.kiln/init", "/dev", "/proc", "/run", "/sys", "/tmp"}
	if !reflect.DeepEqual(order, wantOrder) {
		t.Errorf("order = %v, want %v", order, wantOrder)
	}
	for _, f := range files {
		if f.Path == ImageConfigPath && len(f.Data) != 0 {
			t.Errorf("image config = %q, want an empty placeholder", f.Data)
		}
	}
}

func TestBundleEverythingOnSystemd(t *testing.T) {
	files, err := Bundle([]Piece{PieceNetwork, PieceAgent, PieceInit}, binDir(t), true)
	if err != nil {
		t.Fatal(err)
	}
	got, order := summarize(t, files)
	want := map[string]fileSummary{
		"/.kiln":                                 {kind: "dir", mode: 0o755},
		"/.kiln/agent":                           {kind: "source", mode: 0o755, target: AgentBinary},
		"/.kiln/image-config.json":               {kind: "data", mode: 0o644},
		"/.kiln/init":                            {kind: "source", mode: 0o755, target: InitBinary},
		"/dev":                                   {kind: "dir", mode: 0o755},
		"/proc":                                  {kind: "dir", mode: 0o555},
		"/run":                                   {kind: "dir", mode: 0o755},
		"/sys":                                   {kind: "dir", mode: 0o555},
		"/tmp":                                   {kind: "dir", mode: 0o1777},
		"/etc":                                   {kind: "dir", mode: 0o755},
		"/etc/modules-load.d":                    {kind: "dir", mode: 0o755},
		"/etc/modules-load.d/kiln-vsock.conf":    {kind: "data", mode: 0o644},
		"/etc/systemd":                           {kind: "dir", mode: 0o755},
		"/etc/systemd/system":                    {kind: "dir", mode: 0o755},
		"/etc/systemd/system/kiln-agent.service": {kind: "data", mode: 0o644},
		"/etc/systemd/system/kiln-network.service":    {kind: "data", mode: 0o644},
		"/etc/systemd/system/multi-user.target.wants": {kind: "dir", mode: 0o755},
		"/etc/systemd/system/multi-user.target.wants/kiln-agent.service": {kind: "symlink", mode: 0o777,
			target: "/etc/systemd/system/kiln-agent.service"},
		"/etc/systemd/system/sysinit.target.wants": {kind: "dir", mode: 0o755},
		"/etc/systemd/system/sysinit.target.wants/kiln-network.service": {kind: "symlink", mode: 0o777,
			target: "/etc/systemd/system/kiln-network.service"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("files:\n%+v\nwant:\n%+v", got, want)
	}
	// Every directory comes before what it holds.
	seen := map[string]bool{}
	for _, p := range order {
		if parent := filepath.Dir(p); parent != "/" && !seen[parent] {
			t.Errorf("%s is listed before its directory %s", p, parent)
		}
		seen[p] = true
	}

	content := map[string]string{}
	for _, f := range files {
		content[f.Path] = string(f.Data)
	}
	for path, lines := range map[string][]string{
		AgentUnitPath: {"ExecStart=/.kiln/agent\n", "Restart=always\n", "WantedBy=multi-user.target\n",
			"After=systemd-modules-load.service"},
		NetworkUnitPath: {"Type=oneshot\n", "ExecStart=/.kiln/init --network-only\n",
			"Before=network-pre.target", "Wants=network-pre.target\n", "DefaultDependencies=no\n",
			"WantedBy=sysinit.target\n"},
		VsockModulesPath: {"\nvmw_vsock_virtio_transport\n"},
	} {
		for _, l := range lines {
			if !strings.Contains(content[path], l) {
				t.Errorf("%s lacks %q:\n%s", path, l, content[path])
			}
		}
	}
}

func TestBundleNetworkOnSystemdWithoutInit(t *testing.T) {
	files, err := Bundle([]Piece{PieceNetwork}, binDir(t), true)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := summarize(t, files)
	if got[InitPath].kind != "source" {
		t.Error("the network unit runs /.kiln/init, which is missing")
	}
	if _, ok := got[ImageConfigPath]; ok {
		t.Error("image config written without the init piece")
	}
	if _, ok := got[AgentUnitPath]; ok {
		t.Error("agent unit written without the agent piece")
	}
	if got[NetworkUnitWantsPath].kind != "symlink" {
		t.Error("network unit not enabled")
	}
}

func TestBundleWithoutSystemdLeavesItToInit(t *testing.T) {
	files, err := Bundle([]Piece{PieceInit, PieceAgent, PieceNetwork}, binDir(t), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if strings.HasPrefix(f.Path, "/etc") {
			t.Errorf("%s written to an image without systemd", f.Path)
		}
	}
}

func TestBundleErrors(t *testing.T) {
	bins := binDir(t)
	dynamic := t.TempDir()
	writeELF(t, filepath.Join(dynamic, InitBinary), elf.ET_EXEC, "/lib64/ld-linux-x86-64.so.2")
	notELF := t.TempDir()
	os.WriteFile(filepath.Join(notELF, InitBinary), []byte("#!/bin/sh\n"), 0o755)
	object := t.TempDir()
	writeELF(t, filepath.Join(object, InitBinary), elf.ET_REL, "")

	for _, tc := range []struct {
		name       string
		pieces     []Piece
		bins       string
		hasSystemd bool
		want       string
	}{
		{"agent without init or systemd", []Piece{PieceAgent}, bins, false, `"agent" needs systemd in the image or the "init" piece`},
		{"network without init or systemd", []Piece{PieceNetwork}, bins, false, `"network" needs systemd`},
		{"unknown piece", []Piece{"sshd"}, bins, false, `unknown guest piece "sshd"`},
		{"missing binary", []Piece{PieceInit}, t.TempDir(), false, "does not exist; build it with CGO_ENABLED=0"},
		{"dynamic binary", []Piece{PieceInit}, dynamic, false, "dynamically linked"},
		{"not ELF", []Piece{PieceInit}, notELF, false, "not an ELF executable"},
		{"relocatable object", []Piece{PieceInit}, object, false, "not an executable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Bundle(tc.pieces, tc.bins, tc.hasSystemd)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}

	if files, err := Bundle(nil, bins, true); err != nil || files != nil {
		t.Errorf("no pieces: %v, %v", files, err)
	}
}

func TestFindBinDir(t *testing.T) {
	onlyInit := t.TempDir()
	writeELF(t, filepath.Join(onlyInit, InitBinary), elf.ET_EXEC, "")
	both := binDir(t)

	dir, err := findBinDirIn([]string{t.TempDir(), onlyInit, both}, []string{InitBinary, AgentBinary})
	if err != nil || dir != both {
		t.Errorf("both binaries: %q, %v; want %q", dir, err, both)
	}
	dir, err = findBinDirIn([]string{t.TempDir(), onlyInit, both}, BinariesFor([]Piece{PieceNetwork}))
	if err != nil || dir != onlyInit {
		t.Errorf("init only: %q, %v; want %q", dir, err, onlyInit)
	}
	if _, err := findBinDirIn([]string{onlyInit}, []string{InitBinary, AgentBinary}); err == nil ||
		!strings.Contains(err.Error(), "/usr/libexec/kiln") {
		t.Errorf("err = %v, want one listing where it looked", err)
	}
}

func TestBinariesFor(t *testing.T) {
	for _, tc := range []struct {
		pieces []Piece
		want   []string
	}{
		{[]Piece{PieceInit}, []string{InitBinary}},
		{[]Piece{PieceNetwork}, []string{InitBinary}},
		{[]Piece{PieceAgent}, []string{AgentBinary}},
		{AllPieces, []string{InitBinary, AgentBinary}},
	} {
		if got := BinariesFor(tc.pieces); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("BinariesFor(%v) = %v, want %v", tc.pieces, got, tc.want)
		}
	}
}

func TestCheckStaticELFOnRealBinary(t *testing.T) {
	// The Go toolchain builds static binaries without cgo; the running
	// test binary is one when cgo is off, and can be checked either way.
	exe, err := os.Executable()
	if err != nil {
		t.Skip(err)
	}
	f, err := elf.Open(exe)
	if err != nil {
		t.Skip(err)
	}
	dynamic := false
	for _, p := range f.Progs {
		dynamic = dynamic || p.Type == elf.PT_INTERP
	}
	f.Close()
	if err := CheckStaticELF(exe); (err != nil) != dynamic {
		t.Errorf("CheckStaticELF(test binary, dynamic=%v) = %v", dynamic, err)
	}
}
