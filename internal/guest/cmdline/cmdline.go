// Package cmdline parses the Linux kernel command line the way the kernel
// itself splits it into parameters.
package cmdline

import (
	"fmt"
	"os"
	"strings"
)

// ProcPath is where the running kernel exposes its command line.
const ProcPath = "/proc/cmdline"

// Param is one kernel parameter: "key=value", or a bare "key".
type Param struct {
	Key      string
	Value    string
	HasValue bool
}

// Cmdline is a parsed kernel command line.
type Cmdline struct {
	// Params are the kernel parameters in order, up to a "--" separator.
	Params []Param
	// Init holds the words after "--", which the kernel passes to init
	// unchanged.
	Init []string
}

// Read parses the running kernel's command line.
func Read() (Cmdline, error) {
	data, err := os.ReadFile(ProcPath)
	if err != nil {
		return Cmdline{}, fmt.Errorf("read kernel command line: %w", err)
	}
	return Parse(string(data)), nil
}

// Parse splits a kernel command line. It follows the kernel's next_arg():
// parameters are separated by whitespace, double quotes protect whitespace,
// and quotes around a whole parameter or around its value are removed.
func Parse(s string) Cmdline {
	var c Cmdline
	rest := strings.Trim(s, spaces)
	for rest != "" {
		var word string
		word, rest = nextWord(rest)
		if word == "--" {
			c.Init = initArgs(rest)
			break
		}
		c.Params = append(c.Params, parseParam(word))
	}
	return c
}

// FromParams makes a Cmdline of parameters given one by one as "key=value"
// or "key", whose values need no quoting however many spaces they hold.
func FromParams(params ...string) Cmdline {
	var c Cmdline
	for _, p := range params {
		key, value, hasValue := strings.Cut(p, "=")
		c.Params = append(c.Params, Param{Key: key, Value: value, HasValue: hasValue})
	}
	return c
}

// nextWord returns the first whitespace-separated word of s, honouring
// double quotes, and the remainder with leading whitespace removed.
func nextWord(s string) (word, rest string) {
	inQuote := false
	i := 0
	for ; i < len(s); i++ {
		if s[i] == '"' {
			inQuote = !inQuote
		} else if !inQuote && isSpace(s[i]) {
			break
		}
	}
	return s[:i], strings.TrimLeft(s[i:], spaces)
}

func parseParam(word string) Param {
	quoted := strings.HasPrefix(word, `"`)
	if quoted {
		word = word[1:]
	}
	key, value, hasValue := strings.Cut(word, "=")
	if !hasValue {
		if quoted {
			key = strings.TrimSuffix(key, `"`)
		}
		return Param{Key: key}
	}
	if strings.HasPrefix(value, `"`) {
		value = strings.TrimSuffix(value[1:], `"`)
	} else if quoted {
		value = strings.TrimSuffix(value, `"`)
	}
	return Param{Key: key, Value: value, HasValue: true}
}

// initArgs splits what follows "--" into init's argv. The kernel applies the
// same quoting rules there, removing quotes that enclose a whole word.
func initArgs(s string) []string {
	var args []string
	for s != "" {
		var word string
		word, s = nextWord(s)
		if len(word) >= 2 && word[0] == '"' && word[len(word)-1] == '"' {
			word = word[1 : len(word)-1]
		}
		args = append(args, word)
	}
	return args
}

const spaces = " \t\n\r\v\f"

func isSpace(b byte) bool { return strings.IndexByte(spaces, b) >= 0 }

// Lookup returns the value of the last parameter named key, as the kernel
// lets later parameters override earlier ones. Dashes and underscores in
// names are equivalent, as in the kernel. A bare key has an empty value.
func (c Cmdline) Lookup(key string) (value string, ok bool) {
	for i := len(c.Params) - 1; i >= 0; i-- {
		if sameKey(c.Params[i].Key, key) {
			return c.Params[i].Value, true
		}
	}
	return "", false
}

// Get returns the value of key, or "" when it is absent.
func (c Cmdline) Get(key string) string {
	v, _ := c.Lookup(key)
	return v
}

func sameKey(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == '-' {
			x = '_'
		}
		if y == '-' {
			y = '_'
		}
		if x != y {
			return false
		}
	}
	return true
}
