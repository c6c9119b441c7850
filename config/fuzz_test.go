package config

import (
	"reflect"
	"testing"
)

// FuzzLoad loads any bytes as a configuration file: Load must not panic,
// and what it accepts must encode to a file that loads to the same
// configuration.
func FuzzLoad(f *testing.F) {
	def, err := Default().Encode()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(def)
	for _, seed := range []string{
		"",
		"version = 1\nroot = \"/srv/kiln\"\nsocket_group = \"kiln\"\n[snapshotter]\nblock_devices = true\nunused_disk_grace = \"90s\"\n",
		"[build]\nsize = \"4GiB\"\ninject = [\"init\", \"agent\"]\nwriter = \"e2fsprogs\"\n",
		"[limits]\nlayer_bytes = \"0\"\nentries = 0\npath_depth = 12\nxattr_bytes = \"1K\"\n",
		"socket_mode = \"0600\"\nlog_format = \"json\"\nlog_level = \"debug\"\n",
		"version = 2",
		"[build]\nsize = \"lots\"",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		c, err := Load(write(t, string(body)), true)
		if err != nil {
			return
		}
		enc, err := c.Encode()
		if err != nil {
			t.Fatalf("encoding a configuration Load accepted: %v", err)
		}
		again, err := Load(write(t, string(enc)), true)
		if err != nil {
			t.Fatalf("loading a configuration Encode wrote: %v\n%s", err, enc)
		}
		if !reflect.DeepEqual(c, again) {
			t.Fatalf("loaded %+v\nencoded:\n%s\nloaded again %+v", c, enc, again)
		}
	})
}
