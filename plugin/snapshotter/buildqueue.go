package snapshotter

import (
	"context"
	"sync"
	"time"
)

// buildQueue bounds how many disks are built at once. Builds somebody
// waits for (a container start, a view, an export) are urgent; builds
// started ahead of need when a layer is committed are eager. An urgent
// build never waits for an eager one: eager builds only start while fewer
// than limit builds of any kind run, urgent builds while fewer than limit
// urgent ones do. An eager build still queued becomes urgent as soon as
// somebody waits for it.
type buildQueue struct {
	limit int

	mu      sync.Mutex
	running int // every build holding a slot
	urgent  int // the urgent ones among them
	waiting []*buildTicket
	// observeWait, if set, is told how long each build waited for its
	// slot.
	observeWait func(urgent bool, d time.Duration)
}

type buildTicket struct {
	urgent   bool
	granted  chan struct{}
	held     bool // granted and not released
	asUrgent bool // counted among the urgent ones while held
}

func newBuildQueue(limit int, observeWait func(urgent bool, d time.Duration)) *buildQueue {
	return &buildQueue{limit: max(limit, 1), observeWait: observeWait}
}

// acquire waits for a slot. hurry, when closed, makes a waiting eager
// build urgent. The returned release gives the slot back.
func (q *buildQueue) acquire(ctx context.Context, urgent bool, hurry <-chan struct{}) (release func(), err error) {
	start := time.Now()
	t := &buildTicket{urgent: urgent, granted: make(chan struct{})}
	q.mu.Lock()
	q.waiting = append(q.waiting, t)
	q.dispatch()
	q.mu.Unlock()
	for {
		select {
		case <-t.granted:
			if q.observeWait != nil {
				q.observeWait(t.asUrgent, time.Since(start))
			}
			return func() { q.release(t) }, nil
		case <-hurry:
			hurry = nil
			q.mu.Lock()
			t.urgent = true
			q.dispatch()
			q.mu.Unlock()
		case <-ctx.Done():
			q.mu.Lock()
			if t.held {
				// Granted meanwhile: give it back.
				q.mu.Unlock()
				q.release(t)
				return nil, ctx.Err()
			}
			q.remove(t)
			q.dispatch()
			q.mu.Unlock()
			return nil, ctx.Err()
		}
	}
}

func (q *buildQueue) release(t *buildTicket) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !t.held {
		return
	}
	t.held = false
	q.running--
	if t.asUrgent {
		q.urgent--
	}
	q.dispatch()
}

// dispatch grants slots, urgent tickets first, each class in arrival
// order. Called with mu held.
func (q *buildQueue) dispatch() {
	for _, wantUrgent := range []bool{true, false} {
		for i := 0; i < len(q.waiting); {
			t := q.waiting[i]
			if t.urgent != wantUrgent {
				i++
				continue
			}
			if t.urgent && q.urgent >= q.limit || !t.urgent && q.running >= q.limit {
				break
			}
			q.waiting = append(q.waiting[:i], q.waiting[i+1:]...)
			t.held, t.asUrgent = true, t.urgent
			q.running++
			if t.urgent {
				q.urgent++
			}
			close(t.granted)
		}
	}
}

// depth returns how many builds wait for a slot, by class.
func (q *buildQueue) depth() (urgent, eager int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, t := range q.waiting {
		if t.urgent {
			urgent++
		} else {
			eager++
		}
	}
	return urgent, eager
}

func (q *buildQueue) remove(t *buildTicket) {
	for i, w := range q.waiting {
		if w == t {
			q.waiting = append(q.waiting[:i], q.waiting[i+1:]...)
			return
		}
	}
}
