package vmboot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestWaitForLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	// The guest writes the file bit by bit, with serial line endings, and
	// only after the wait has started.
	go func() {
		time.Sleep(50 * time.Millisecond)
		f, err := os.Create(path)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		for _, chunk := range []string{"[ 0.1] booting\r\n", "mark", "er: rea", "dy\r\n", "after\r\n"} {
			time.Sleep(30 * time.Millisecond)
			if _, err := f.WriteString(chunk); err != nil {
				t.Error(err)
			}
		}
	}()

	line, err := WaitForLine(t.Context(), path, regexp.MustCompile(`^marker: \w+$`), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if line != "marker: ready" {
		t.Errorf("line = %q, want %q", line, "marker: ready")
	}
}

func TestWaitForLineTimeout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(path, []byte("first\r\nlast words\r\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := WaitForLine(t.Context(), path, regexp.MustCompile("never"), 100*time.Millisecond)
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("error = %v, want ErrTimeout", err)
	}
	if !strings.Contains(err.Error(), "last words") {
		t.Errorf("error %q does not show the console tail", err)
	}
}

func TestWaitForLineUnfinishedLastLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	if err := os.WriteFile(path, []byte("login: "), 0o644); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	close(exited)
	line, err := waitForLine(t.Context(), path, regexp.MustCompile("^login:"), time.Second, exited)
	if err != nil || line != "login: " {
		t.Errorf("waitForLine = %q, %v; want the unfinished last line once the VM has exited", line, err)
	}
}

func TestTail(t *testing.T) {
	var b strings.Builder
	for i := range 100 {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	if got, want := tail(b.String(), 3), "line 97\nline 98\nline 99"; got != want {
		t.Errorf("tail = %q, want %q", got, want)
	}
	if got := tail("", 3); got != "" {
		t.Errorf("tail of nothing = %q", got)
	}
}
