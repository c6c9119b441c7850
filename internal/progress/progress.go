// Package progress reports long-running work: progress bars on a
// terminal, nothing otherwise.
package progress

import (
	"io"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// Bar tracks one stage of work.
type Bar interface {
	// Add records n more units done.
	Add(n int64)
	// SetTotal changes the amount of work the stage has.
	SetTotal(n int64)
	// Done marks the stage finished.
	Done()
}

// Reporter starts bars.
type Reporter interface {
	// Bar starts a stage named name of total units; bytes says whether the
	// units are bytes.
	Bar(name string, total int64, bytes bool) Bar
	// Wait waits for the bars to be drawn for the last time.
	Wait()
}

// Discard reports nothing.
var Discard Reporter = discard{}

type discard struct{}

func (discard) Bar(string, int64, bool) Bar { return nop{} }
func (discard) Wait()                       {}

type nop struct{}

func (nop) Add(int64)      {}
func (nop) SetTotal(int64) {}
func (nop) Done()          {}

// Terminal draws bars on w, which should be a terminal.
func Terminal(w io.Writer) Reporter {
	return &terminal{p: mpb.New(mpb.WithOutput(w), mpb.WithWidth(40), mpb.WithRefreshRate(150*time.Millisecond))}
}

type terminal struct{ p *mpb.Progress }

func (t *terminal) Bar(name string, total int64, bytes bool) Bar {
	counter := decor.CountersNoUnit("%d / %d")
	if bytes {
		counter = decor.Counters(decor.SizeB1024(0), "% .1f / % .1f")
	}
	b := t.p.AddBar(total,
		mpb.PrependDecorators(decor.Name(name, decor.WC{C: decor.DindentRight | decor.DextraSpace}), counter),
		mpb.AppendDecorators(decor.OnComplete(decor.Elapsed(decor.ET_STYLE_GO), "done")),
	)
	return &bar{b: b}
}

func (t *terminal) Wait() { t.p.Wait() }

type bar struct{ b *mpb.Bar }

func (b *bar) Add(n int64)      { b.b.IncrInt64(n) }
func (b *bar) SetTotal(n int64) { b.b.SetTotal(n, false) }
func (b *bar) Done()            { b.b.SetTotal(-1, true) }

// Reader counts what is read from r on bar.
func Reader(r io.Reader, b Bar) io.Reader { return &countingReader{r: r, b: b} }

type countingReader struct {
	r io.Reader
	b Bar
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.b.Add(int64(n))
	return n, err
}
