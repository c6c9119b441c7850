package cmdline

import (
	"reflect"
	"testing"
)

func TestParse(t *testing.T) {
	c := Parse(`console=ttyS0 ro  quiet kiln.hostname=web "kiln.dns=1.1.1.1" ` +
		`msg="hello world" ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off panic=1 panic=2` +
		` -- /bin/sh -c "echo hi"` + "\n")

	want := []Param{
		{Key: "console", Value: "ttyS0", HasValue: true},
		{Key: "ro"},
		{Key: "quiet"},
		{Key: "kiln.hostname", Value: "web", HasValue: true},
		{Key: "kiln.dns", Value: "1.1.1.1", HasValue: true},
		{Key: "msg", Value: "hello world", HasValue: true},
		{Key: "ip", Value: "10.0.0.2::10.0.0.1:255.255.255.0::eth0:off", HasValue: true},
		{Key: "panic", Value: "1", HasValue: true},
		{Key: "panic", Value: "2", HasValue: true},
	}
	if !reflect.DeepEqual(c.Params, want) {
		t.Errorf("Params =\n%+v\nwant\n%+v", c.Params, want)
	}
	if wantInit := []string{"/bin/sh", "-c", "echo hi"}; !reflect.DeepEqual(c.Init, wantInit) {
		t.Errorf("Init = %q, want %q", c.Init, wantInit)
	}
	if v := c.Get("panic"); v != "2" {
		t.Errorf("last parameter should win: panic = %q", v)
	}
	if v, ok := c.Lookup("ro"); !ok || v != "" {
		t.Errorf("Lookup(ro) = %q, %v; want bare key present", v, ok)
	}
	if _, ok := c.Lookup("kiln.agent"); ok {
		t.Error("Lookup of an absent key reported it present")
	}
}

func TestLookupDashUnderscore(t *testing.T) {
	c := Parse("foo-bar=1 baz_qux=2")
	if c.Get("foo_bar") != "1" || c.Get("baz-qux") != "2" {
		t.Errorf("dash and underscore should be equivalent: %+v", c.Params)
	}
}

func TestParseEmpty(t *testing.T) {
	for _, s := range []string{"", "  \n", "--", "-- "} {
		c := Parse(s)
		if len(c.Params) != 0 || len(c.Init) != 0 {
			t.Errorf("Parse(%q) = %+v, want empty", s, c)
		}
	}
}

func TestFromParams(t *testing.T) {
	c := FromParams("quiet", "dm-mod.create=vroot,,,ro,0 8 linear /dev/vda 0", "a=b=c")
	want := []Param{
		{Key: "quiet"},
		{Key: "dm-mod.create", Value: "vroot,,,ro,0 8 linear /dev/vda 0", HasValue: true},
		{Key: "a", Value: "b=c", HasValue: true},
	}
	if !reflect.DeepEqual(c.Params, want) {
		t.Errorf("Params =\n%+v\nwant\n%+v", c.Params, want)
	}
}
