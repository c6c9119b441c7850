package netconf

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
)

func addrs(ss ...string) []netip.Addr {
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

func TestParseIPParam(t *testing.T) {
	a := netip.MustParseAddr
	for _, tc := range []struct {
		in   string
		want IPParam
	}{
		{"off", IPParam{Off: true, PrefixLen: -1}},
		{"none", IPParam{Off: true, PrefixLen: -1}},
		{"dhcp", IPParam{Autoconf: "dhcp", PrefixLen: -1}},
		{"on", IPParam{Autoconf: "on", PrefixLen: -1}},
		{
			"10.0.2.15:10.0.2.2:10.0.2.1:255.255.255.0:web:eth1:off:1.1.1.1:8.8.8.8:10.0.2.3",
			IPParam{
				Client: a("10.0.2.15"), Server: a("10.0.2.2"), Gateway: a("10.0.2.1"), PrefixLen: 24,
				Hostname: "web", Device: "eth1", Autoconf: "off",
				DNS: addrs("1.1.1.1", "8.8.8.8"), NTP: a("10.0.2.3"),
			},
		},
		{
			// Trailing fields may be left out; empty fields and 0.0.0.0
			// are unset.
			"172.16.0.2:0.0.0.0:172.16.0.1:255.255.0.0",
			IPParam{Client: a("172.16.0.2"), Gateway: a("172.16.0.1"), PrefixLen: 16},
		},
		{"192.168.1.5::::::dhcp", IPParam{Client: a("192.168.1.5"), PrefixLen: -1, Autoconf: "dhcp"}},
		{"10.1.2.3:::30", IPParam{Client: a("10.1.2.3"), PrefixLen: 30}}, // prefix length accepted too
		{":::::::9.9.9.9", IPParam{PrefixLen: -1, DNS: addrs("9.9.9.9")}},
	} {
		got, err := ParseIPParam(tc.in)
		if err != nil {
			t.Errorf("ParseIPParam(%q): %v", tc.in, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseIPParam(%q) =\n %+v\nwant\n %+v", tc.in, got, tc.want)
		}
	}
}

func TestParseIPParamErrors(t *testing.T) {
	for _, in := range []string{
		"10.0.0.300",
		"fd00::2",
		"10.0.0.2::10.0.0.1:255.0.255.0",
		"10.0.0.2::10.0.0.1:33",
		"10.0.0.2::10.0.0.1:255.255.255.0::eth0:static",
		"1:2:3:4:5:6:7:8:9:10:11",
		"10.0.0.2::gateway",
	} {
		if p, err := ParseIPParam(in); err == nil {
			t.Errorf("ParseIPParam(%q) = %+v, want an error", in, p)
		} else if !strings.Contains(err.Error(), "ip=") {
			t.Errorf("error %q should quote the parameter", err)
		}
	}
}

func TestPrefixDefaultsToClass(t *testing.T) {
	for addr, want := range map[string]string{
		"10.1.2.3":    "10.1.2.3/8",
		"172.16.5.4":  "172.16.5.4/16",
		"192.168.1.9": "192.168.1.9/24",
	} {
		p, err := ParseIPParam(addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Prefix().String(); got != want {
			t.Errorf("Prefix for %s = %s, want %s", addr, got, want)
		}
	}
}

func TestFromCmdline(t *testing.T) {
	cfg, err := FromCmdline(cmdline.Parse("console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0:fromip:eth0:off:1.1.1.1"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.IP == nil || cfg.Hostname != "fromip" || !reflect.DeepEqual(cfg.DNS, addrs("1.1.1.1")) {
		t.Errorf("cfg = %+v", cfg)
	}

	// kiln.dns and kiln.hostname take precedence over ip=.
	cfg, err = FromCmdline(cmdline.Parse("ip=10.0.0.2::10.0.0.1:255.255.255.0:fromip:eth0:off:1.1.1.1 " +
		"kiln.dns=9.9.9.9,2606:4700:4700::1111 kiln.hostname=fromkiln"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Hostname != "fromkiln" || !reflect.DeepEqual(cfg.DNS, addrs("9.9.9.9", "2606:4700:4700::1111")) {
		t.Errorf("cfg = %+v", cfg)
	}

	cfg, err = FromCmdline(cmdline.Parse("quiet"))
	if err != nil || cfg.IP != nil || cfg.DNS != nil || cfg.Hostname != "" {
		t.Errorf("no network parameters: cfg = %+v, err = %v", cfg, err)
	}

	for _, bad := range []string{"ip=10.0.0.999", "kiln.dns=one.one.one.one", "kiln.hostname=a/b",
		"kiln.hostname=" + strings.Repeat("x", 65)} {
		if _, err := FromCmdline(cmdline.Parse(bad)); err == nil {
			t.Errorf("FromCmdline(%q) succeeded, want an error", bad)
		}
	}
}

func TestResolveHostname(t *testing.T) {
	root := t.TempDir()
	if got := ResolveHostname(Config{}, root); got != DefaultHostname {
		t.Errorf("no /etc/hostname: got %q", got)
	}
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("  fromimage \nsecond\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := ResolveHostname(Config{}, root); got != "fromimage" {
		t.Errorf("image hostname: got %q", got)
	}
	if got := ResolveHostname(Config{Hostname: "fromcmdline"}, root); got != "fromcmdline" {
		t.Errorf("command line hostname: got %q", got)
	}
}

func TestParsePNP(t *testing.T) {
	servers, domain := ParsePNP(strings.NewReader(
		"#PROTO: DHCP\ndomain example.internal\nnameserver 10.0.0.53\nnameserver 0.0.0.0\nbootserver 10.0.0.1\n"))
	if !reflect.DeepEqual(servers, addrs("10.0.0.53")) || domain != "example.internal" {
		t.Errorf("got %v %q", servers, domain)
	}
}

func TestWriteResolvConf(t *testing.T) {
	root := t.TempDir()
	etc := filepath.Join(root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	// Images often point /etc/resolv.conf at systemd-resolved's stub.
	stub := filepath.Join(root, "stub-resolv.conf")
	if err := os.WriteFile(stub, []byte("nameserver 127.0.0.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(stub, filepath.Join(etc, "resolv.conf")); err != nil {
		t.Fatal(err)
	}

	written, err := WriteResolvConf(root, filepath.Join(root, "run"), addrs("1.1.1.1", "8.8.8.8"), "corp")
	if err != nil {
		t.Fatal(err)
	}
	if written != filepath.Join(etc, "resolv.conf") {
		t.Errorf("wrote %s", written)
	}
	fi, err := os.Lstat(written)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Fatalf("resolv.conf should be a regular 0644 file now: %v %v", fi, err)
	}
	data, _ := os.ReadFile(written)
	for _, want := range []string{"search corp\n", "nameserver 1.1.1.1\nnameserver 8.8.8.8\n"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("resolv.conf lacks %q:\n%s", want, data)
		}
	}
	if old, _ := os.ReadFile(stub); string(old) != "nameserver 127.0.0.53\n" {
		t.Errorf("the symlink's old target was modified: %q", old)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(etc, ".resolv.conf.kiln-*")); len(leftovers) > 0 {
		t.Errorf("temporary files left behind: %v", leftovers)
	}
}
