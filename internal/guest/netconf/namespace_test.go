package netconf

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kilnfs/kiln/internal/guest/cmdline"
	"github.com/kilnfs/kiln/internal/testenv"
)

// nsEnv marks the copy of the test binary that runs inside fresh network,
// UTS and mount namespaces.
const nsEnv = "KILN_NETCONF_TEST_IN_NAMESPACES"

// inNamespaces runs the calling test again in a child process with its own
// network, UTS and mount namespaces, so that it can change interfaces, the
// hostname and mounts without touching the machine. It returns true in the
// child, where the test body should run, and false in the parent.
func inNamespaces(t *testing.T) bool {
	t.Helper()
	if os.Getenv(nsEnv) == "1" {
		return true
	}
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "creating network, UTS and mount namespaces needs root")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), nsEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWUTS,
		// Go makes the new mount namespace private, so mounts stay in it.
		Unshareflags: syscall.CLONE_NEWNS,
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		if strings.Contains(err.Error(), "operation not permitted") {
			t.Skipf("skipping: cannot create namespaces: %v", err)
		}
		t.Fatalf("test in namespaces failed: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatalf("test in namespaces did not pass:\n%s", out)
	}
	t.Logf("ran in fresh namespaces:\n%s", out)
	return false
}

// addVeth creates a veth pair whose first end is named name.
func addVeth(t *testing.T, name string) netlink.Link {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "-peer"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Skipf("skipping: cannot create a veth pair: %v", err)
	}
	peer, err := netlink.LinkByName(name + "-peer")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(peer); err != nil {
		t.Fatal(err)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return link
}

func defaultRoute(t *testing.T, link netlink.Link) *netlink.Route {
	t.Helper()
	routes, err := netlink.RouteList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() {
			return &r
		}
	}
	return nil
}

func hasAddr(t *testing.T, link netlink.Link, cidr string) bool {
	t.Helper()
	list, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range list {
		if a.IPNet.String() == cidr {
			return true
		}
	}
	return false
}

func TestConfigureLinks(t *testing.T) {
	if !inNamespaces(t) {
		return
	}
	eth0 := addVeth(t, "eth0")
	p, err := ParseIPParam("10.99.0.2::10.99.0.1:255.255.255.0::eth0:off")
	if err != nil {
		t.Fatal(err)
	}
	logf := func(f string, a ...any) { t.Logf(f, a...) }
	if err := ConfigureLinks(&p, time.Second, logf); err != nil {
		t.Fatal(err)
	}
	// A second run finds everything in place, as after the kernel's own
	// CONFIG_IP_PNP configuration, and must not fail.
	if err := ConfigureLinks(&p, time.Second, logf); err != nil {
		t.Fatalf("configuring again: %v", err)
	}

	lo, _ := netlink.LinkByName("lo")
	if lo.Attrs().Flags&net.FlagUp == 0 {
		t.Error("lo is not up")
	}
	eth0, _ = netlink.LinkByName("eth0")
	if eth0.Attrs().Flags&net.FlagUp == 0 {
		t.Error("eth0 is not up")
	}
	if !hasAddr(t, eth0, "10.99.0.2/24") {
		t.Error("eth0 lacks 10.99.0.2/24")
	}
	r := defaultRoute(t, eth0)
	if r == nil || !r.Gw.Equal(net.ParseIP("10.99.0.1")) {
		t.Errorf("default route = %+v, want via 10.99.0.1", r)
	}
}

func TestConfigureLinksDefaultDeviceAndOnlinkGateway(t *testing.T) {
	if !inNamespaces(t) {
		return
	}
	// No eth0 here: without a device in ip=, the first non-loopback
	// interface is used.
	tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "ens3"}, Mode: netlink.TUNTAP_MODE_TAP}
	if err := netlink.LinkAdd(tap); err != nil {
		t.Skipf("skipping: cannot create a tap device: %v", err)
	}
	link, err := netlink.LinkByName("ens3")
	if err != nil {
		t.Fatal(err)
	}
	p, err := ParseIPParam("192.168.7.10::10.0.0.1:255.255.255.255")
	if err != nil {
		t.Fatal(err)
	}
	if err := ConfigureLinks(&p, time.Second, t.Logf); err != nil {
		t.Fatal(err)
	}
	if !hasAddr(t, link, "192.168.7.10/32") {
		t.Error("ens3 lacks 192.168.7.10/32")
	}
	r := defaultRoute(t, link)
	if r == nil || !r.Gw.Equal(net.ParseIP("10.0.0.1")) || r.Flags&int(netlink.FLAG_ONLINK) == 0 {
		t.Errorf("default route = %+v, want on-link via 10.0.0.1", r)
	}
}

func TestConfigureLinksMissingDevice(t *testing.T) {
	if !inNamespaces(t) {
		return
	}
	p, err := ParseIPParam("10.99.0.2::10.99.0.1:255.255.255.0::eth7:off")
	if err != nil {
		t.Fatal(err)
	}
	err = ConfigureLinks(&p, 200*time.Millisecond, t.Logf)
	if err == nil || !strings.Contains(err.Error(), "eth7") || !strings.Contains(err.Error(), "interfaces: lo") {
		t.Errorf("err = %v, want one naming eth7 and the available interfaces", err)
	}
}

func TestSetup(t *testing.T) {
	if !inNamespaces(t) {
		return
	}
	addVeth(t, "eth0")
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg, err := FromCmdline(cmdline.Parse("ip=10.5.0.2::10.5.0.1:255.255.0.0:vm1:eth0:off:10.5.0.53 kiln.dns=10.5.0.54"))
	if err != nil {
		t.Fatal(err)
	}
	var warnings []string
	opts := Options{Root: root, RunDir: filepath.Join(root, "run"), Warnf: func(f string, a ...any) {
		warnings = append(warnings, f)
	}}
	if err := Setup(cfg, opts); err != nil {
		t.Fatal(err)
	}
	if name, _ := os.Hostname(); name != "vm1" {
		t.Errorf("hostname = %q, want vm1", name)
	}
	data, err := os.ReadFile(filepath.Join(root, "etc/resolv.conf"))
	if err != nil || !strings.Contains(string(data), "nameserver 10.5.0.54\n") || strings.Contains(string(data), "10.5.0.53") {
		t.Errorf("resolv.conf = %q, %v; want only kiln.dns servers", data, err)
	}
	eth0, _ := netlink.LinkByName("eth0")
	if !hasAddr(t, eth0, "10.5.0.2/16") {
		t.Error("eth0 lacks 10.5.0.2/16")
	}
	if len(warnings) > 0 {
		t.Errorf("unexpected warnings: %q", warnings)
	}

	// An autoconfiguration request is warned about, not failed.
	warnings = nil
	cfg, err = FromCmdline(cmdline.Parse("ip=dhcp"))
	if err != nil {
		t.Fatal(err)
	}
	if err := Setup(cfg, opts); err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "does not implement") {
		t.Errorf("warnings = %q, want one about autoconfiguration", warnings)
	}
}

func TestWriteResolvConfReadOnlyEtc(t *testing.T) {
	if !inNamespaces(t) {
		return
	}
	root := t.TempDir()
	etc := filepath.Join(root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver 192.0.2.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Make etc read-only, as on a root mounted "ro".
	mountReadOnly(t, etc)
	run := filepath.Join(root, "run")

	for _, servers := range [][]netip.Addr{addrs("1.1.1.1"), addrs("9.9.9.9")} {
		written, err := WriteResolvConf(root, run, servers, "")
		if err != nil {
			t.Fatal(err)
		}
		if written != filepath.Join(run, "resolv.conf") {
			t.Errorf("wrote %s, want the file under run", written)
		}
		data, err := os.ReadFile(filepath.Join(etc, "resolv.conf"))
		if want := "nameserver " + servers[0].String() + "\n"; err != nil || !strings.Contains(string(data), want) {
			t.Errorf("/etc/resolv.conf = %q, %v; want it to show %q through the bind mount", data, err, want)
		}
	}

	// Without an existing file on the read-only /etc there is nothing to
	// mount over.
	other := t.TempDir()
	if err := os.Mkdir(filepath.Join(other, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	mountReadOnly(t, filepath.Join(other, "etc"))
	_, err := WriteResolvConf(other, filepath.Join(other, "run"), addrs("1.1.1.1"), "")
	if err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("err = %v, want a read-only error", err)
	}
}

// mountReadOnly bind-mounts dir read-only over itself, and everything under
// it away again when the test ends so that the temporary directory can be
// removed.
func mountReadOnly(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Lazily detach the bind and anything mounted on top of it.
		for unix.Unmount(dir, unix.MNT_DETACH) == nil {
		}
		for unix.Unmount(filepath.Join(dir, "resolv.conf"), unix.MNT_DETACH) == nil {
		}
	})
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
}
