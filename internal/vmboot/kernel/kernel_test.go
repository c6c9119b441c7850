package kernel

import "testing"

func TestImageDependency(t *testing.T) {
	for _, tc := range []struct {
		depends, name, version string
		ok                     bool
	}{
		{"linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)", "linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", true},
		{"initramfs-tools, linux-image-6.12.9-cloud-amd64", "linux-image-6.12.9-cloud-amd64", "", true},
		{"linux-headers-6.1.0-56-cloud-amd64", "", "", false},
		{"", "", "", false},
	} {
		name, version, err := imageDependency(tc.depends)
		if (err == nil) != tc.ok || name != tc.name || version != tc.version {
			t.Errorf("imageDependency(%q) = %q, %q, %v; want %q, %q, ok=%v",
				tc.depends, name, version, err, tc.name, tc.version, tc.ok)
		}
	}
}

func TestFetchPackageRejectsNonKernel(t *testing.T) {
	if _, err := FetchPackage(t.Context(), t.TempDir(), "busybox-static", "1"); err == nil {
		t.Error("FetchPackage accepted a package that is not a kernel image")
	}
}
