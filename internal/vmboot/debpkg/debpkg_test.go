package debpkg

import "testing"

func TestParseControl(t *testing.T) {
	out := []byte(`Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description-en: Linux for x86-64 cloud
 This package depends on the latest Linux kernel.

Package: linux-image-cloud-amd64
Version: 6.1.176-1
`)
	got := parseControl(out)
	want := Package{
		Name:    "linux-image-cloud-amd64",
		Version: "6.1.192-2",
		Depends: "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)",
	}
	if got != want {
		t.Errorf("parseControl = %+v, want %+v", got, want)
	}
}

func TestFetchRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "../etc", "-o", "a=b", "a b"} {
		if _, err := Fetch(t.Context(), t.TempDir(), name, "1.0"); err == nil {
			t.Errorf("Fetch accepted package name %q", name)
		}
	}
	if _, err := Fetch(t.Context(), t.TempDir(), "busybox", "../1"); err == nil {
		t.Error("Fetch accepted a version with a slash")
	}
}
