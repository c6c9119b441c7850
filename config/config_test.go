package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func write(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	c, err := Load(filepath.Join(t.TempDir(), "missing.toml"), false)
	if err != nil {
		t.Fatal(err)
	}
	if c.Root != "/var/lib/kiln" || c.Address != "/run/kiln/kiln.sock" || c.ContainerdAddress != "/run/containerd/containerd.sock" || c.SocketMode != "0660" || c.SocketGroup != "" {
		t.Errorf("defaults: %+v", c)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.toml"), true); err == nil {
		t.Errorf("a missing file that was asked for must be an error")
	}
}

func TestLoad(t *testing.T) {
	c, err := Load(write(t, `
version = 1
root = "/srv/kiln"
[snapshotter]
block_devices = true
[build]
size = "4G"
verity = true
`), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.Root != "/srv/kiln" || !c.Snapshotter.BlockDevices || c.Build.Size != "4G" || !c.Build.Verity || c.Address != "/run/kiln/kiln.sock" {
		t.Errorf("loaded: %+v", c)
	}
	if _, err := c.Encode(); err != nil {
		t.Fatal(err)
	}
}

func TestErrors(t *testing.T) {
	for body, want := range map[string]string{
		"version = 2":                      "version",
		"unknown = 1":                      "unknown",
		"[build]\nsize = \"lots\"":         "build.size",
		"log_format = \"xml\"":             "log_format",
		"[snapshotter]\nblock_devices = 3": "config",
		`socket_mode = "0666"`:             "every local user",
		`socket_mode = "rw"`:               "socket_mode",
		`socket_mode = "1660"`:             "socket_mode",
	} {
		_, err := Load(write(t, body), true)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want it to mention %q", body, err, want)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"auto": 0, "": 0, "512M": 512 << 20, "2G": 2 << 30, "2GiB": 2 << 30, "4096": 4096, "1T": 1 << 40} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"-1", "1X", "G", "0"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) should fail", bad)
		}
	}
}
