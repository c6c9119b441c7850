// Package netconf configures the guest network, DNS and hostname from the
// kernel command line: the kernel's own ip= parameter (see the kernel's
// Documentation/admin-guide/nfs/nfsroot.rst) plus kiln.dns= and
// kiln.hostname=.
//
// Parsing is pure and runs anywhere; applying the configuration needs root
// and uses netlink.
package netconf

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// IPParam is the parsed form of the kernel's
//
//	ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0-ip>:<dns1-ip>:<ntp0-ip>
//
// Empty fields, and the address 0.0.0.0, leave a value unset.
type IPParam struct {
	// Off is set by ip=off or ip=none: no configuration at all.
	Off bool
	// Autoconf is the autoconfiguration protocol: "" or "off" for a static
	// configuration, otherwise "on", "any", "dhcp", "bootp", "rarp" or
	// "both". kiln-init does not implement autoconfiguration.
	Autoconf string

	Client  netip.Addr
	Server  netip.Addr
	Gateway netip.Addr
	// PrefixLen is the netmask as a prefix length; -1 when unset.
	PrefixLen int
	Hostname  string
	// Device is the interface name; empty means the default.
	Device string
	DNS    []netip.Addr
	NTP    netip.Addr
}

// Autoconfigures reports whether the parameter asks for DHCP, BOOTP or RARP.
func (p IPParam) Autoconfigures() bool {
	switch p.Autoconf {
	case "", "off", "none":
		return false
	}
	return true
}

// Prefix returns the client address with its netmask. Without a netmask it
// uses the address's historical class, as the kernel does.
func (p IPParam) Prefix() netip.Prefix {
	bits := p.PrefixLen
	if bits < 0 {
		bits = classfulPrefixLen(p.Client)
	}
	return netip.PrefixFrom(p.Client, bits)
}

func classfulPrefixLen(a netip.Addr) int {
	switch first := a.As4()[0]; {
	case first < 128:
		return 8
	case first < 192:
		return 16
	default:
		return 24
	}
}

var autoconfValues = map[string]bool{
	"off": true, "none": true, "on": true, "any": true,
	"dhcp": true, "bootp": true, "rarp": true, "both": true,
}

// ParseIPParam parses the value of ip=.
func ParseIPParam(s string) (IPParam, error) {
	p := IPParam{PrefixLen: -1}
	s = strings.TrimSpace(s)
	switch s {
	case "off", "none":
		p.Off = true
		return p, nil
	case "on", "any", "dhcp", "bootp", "rarp", "both":
		p.Autoconf = s
		return p, nil
	}

	fields := strings.Split(s, ":")
	if len(fields) > 10 {
		return IPParam{}, fmt.Errorf("ip=%s: too many fields (%d, at most 10)", s, len(fields))
	}
	field := func(i int) string {
		if i < len(fields) {
			return strings.TrimSpace(fields[i])
		}
		return ""
	}
	var err error
	if p.Client, err = parseAddr(field(0), "client-ip"); err != nil {
		return IPParam{}, fmt.Errorf("ip=%s: %w", s, err)
	}
	if p.Server, err = parseAddr(field(1), "server-ip"); err != nil {
		return IPParam{}, fmt.Errorf("ip=%s: %w", s, err)
	}
	if p.Gateway, err = parseAddr(field(2), "gw-ip"); err != nil {
		return IPParam{}, fmt.Errorf("ip=%s: %w", s, err)
	}
	if p.PrefixLen, err = parseNetmask(field(3)); err != nil {
		return IPParam{}, fmt.Errorf("ip=%s: %w", s, err)
	}
	p.Hostname = field(4)
	p.Device = field(5)
	if a := field(6); a != "" {
		if !autoconfValues[a] {
			return IPParam{}, fmt.Errorf("ip=%s: unknown autoconf value %q (want off, none, on, any, dhcp, bootp, rarp or both)", s, a)
		}
		p.Autoconf = a
	}
	for i, name := range []string{"dns0-ip", "dns1-ip"} {
		dns, err := parseAddr(field(7+i), name)
		if err != nil {
			return IPParam{}, fmt.Errorf("ip=%s: %w", s, err)
		}
		if dns.IsValid() {
			p.DNS = append(p.DNS, dns)
		}
	}
	if p.NTP, err = parseAddr(field(9), "ntp0-ip"); err != nil {
		return IPParam{}, fmt.Errorf("ip=%s: %w", s, err)
	}
	return p, nil
}

// parseAddr parses an IPv4 address field; "" and 0.0.0.0 mean unset, as in
// the kernel. The kernel's ip= is IPv4-only.
func parseAddr(s, name string) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return netip.Addr{}, fmt.Errorf("%s %q is not an IPv4 address", name, s)
	}
	if a.IsUnspecified() {
		return netip.Addr{}, nil
	}
	return a, nil
}

// parseNetmask accepts a dotted netmask, as the kernel does, or a prefix
// length. It returns -1 for an empty field.
func parseNetmask(s string) (int, error) {
	if s == "" {
		return -1, nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n < 0 || n > 32 {
			return 0, fmt.Errorf("netmask /%d is out of range", n)
		}
		return n, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return 0, fmt.Errorf("netmask %q is not a dotted IPv4 netmask", s)
	}
	if a.IsUnspecified() {
		return -1, nil
	}
	b := a.As4()
	mask := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	ones := 0
	for mask&(1<<31) != 0 {
		ones++
		mask <<= 1
	}
	if mask != 0 {
		return 0, fmt.Errorf("netmask %q is not contiguous", s)
	}
	return ones, nil
}
