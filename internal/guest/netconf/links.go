package netconf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultDevice is the interface configured when ip= names none.
const DefaultDevice = "eth0"

// ConfigureLinks brings up the loopback interface and, for a static ip=,
// gives the device its address, brings it up and adds the default route.
// An autoconfiguration request is only warned about through warnf.
// Netlink calls act on the network namespace of the calling thread.
//
// The kernel may already have applied ip= itself (CONFIG_IP_PNP); addresses
// and routes that already exist are therefore not errors.
func ConfigureLinks(p *IPParam, timeout time.Duration, warnf func(string, ...any)) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find loopback interface: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bring up loopback interface: %w", err)
	}
	if p == nil || p.Off {
		return nil
	}
	if p.Autoconfigures() {
		warnf("ip= asks for %s autoconfiguration, which kiln-init does not implement; "+
			"give a static ip=<client-ip>::<gw-ip>:<netmask>::<device>:off "+
			"(the kernel's own CONFIG_IP_PNP may have configured the interface already)", p.Autoconf)
	}
	if !p.Client.IsValid() {
		return nil
	}

	link, err := waitForLink(p.Device, timeout)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	prefix := p.Prefix()
	addr := &netlink.Addr{IPNet: ipNet(prefix)}
	if err := netlink.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add address %s to %s: %w", prefix, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s: %w", name, err)
	}
	if !p.Gateway.IsValid() {
		return nil
	}
	route := &netlink.Route{
		LinkIndex: link.Attrs().Index,
		Gw:        net.IP(p.Gateway.AsSlice()),
		Dst:       ipNet(netip.PrefixFrom(netip.IPv4Unspecified(), 0)),
	}
	if !prefix.Masked().Contains(p.Gateway) {
		// A gateway outside the subnet is still reachable on the link,
		// as the kernel's own ip= handling assumes.
		route.Flags = int(netlink.FLAG_ONLINK)
	}
	if err := netlink.RouteAdd(route); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add default route via %s on %s: %w", p.Gateway, name, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   net.IP(p.Addr().AsSlice()),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}

// waitForLink returns the named interface, or when name is empty eth0 or
// else the first non-loopback interface, waiting up to timeout for a driver
// that is still probing.
func waitForLink(name string, timeout time.Duration) (netlink.Link, error) {
	deadline := time.Now().Add(timeout)
	for {
		link, err := findLink(name)
		if err == nil || time.Now().After(deadline) {
			return link, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func findLink(name string) (netlink.Link, error) {
	if name != "" {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return nil, fmt.Errorf("network interface %s from ip=: %w%s", name, err, available())
		}
		return link, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list network interfaces: %w", err)
	}
	sort.Slice(links, func(i, j int) bool { return links[i].Attrs().Index < links[j].Attrs().Index })
	var first netlink.Link
	for _, l := range links {
		if l.Attrs().Name == DefaultDevice {
			return l, nil
		}
		if first == nil && l.Attrs().Flags&net.FlagLoopback == 0 {
			first = l
		}
	}
	if first == nil {
		return nil, errors.New("ip= configures an address, but the guest has no network interface")
	}
	return first, nil
}

// available lists the interfaces for an error message.
func available() string {
	links, err := netlink.LinkList()
	if err != nil || len(links) == 0 {
		return ""
	}
	s := " (interfaces:"
	for _, l := range links {
		s += " " + l.Attrs().Name
	}
	return s + ")"
}
