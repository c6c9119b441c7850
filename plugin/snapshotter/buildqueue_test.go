package snapshotter

import (
	"context"
	"testing"
	"time"
)

// granted reports whether acquire returns within a short while.
func tryAcquire(q *buildQueue, urgent bool, hurry <-chan struct{}) (release func(), ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	r, err := q.acquire(ctx, urgent, hurry)
	return r, err == nil
}

// TestBuildQueueUrgentNeverWaitsForEager: with every slot taken by eager
// builds, an urgent build still starts; eager builds wait for a free slot.
func TestBuildQueueUrgentNeverWaitsForEager(t *testing.T) {
	q := newBuildQueue(2, nil)
	e1, ok1 := tryAcquire(q, false, nil)
	e2, ok2 := tryAcquire(q, false, nil)
	if !ok1 || !ok2 {
		t.Fatal("two eager builds should start with two slots")
	}
	if _, ok := tryAcquire(q, false, nil); ok {
		t.Error("a third eager build started beyond the limit")
	}
	u1, ok := tryAcquire(q, true, nil)
	if !ok {
		t.Fatal("an urgent build waited behind eager ones")
	}
	u2, ok := tryAcquire(q, true, nil)
	if !ok {
		t.Fatal("a second urgent build waited behind eager ones")
	}
	if _, ok := tryAcquire(q, true, nil); ok {
		t.Error("a third urgent build started beyond the urgent limit")
	}
	u1()
	if _, ok := tryAcquire(q, false, nil); ok {
		t.Error("an eager build started while the limit is reached")
	}
	for _, r := range []func(){u2, e1, e2} {
		r()
	}
	if r, ok := tryAcquire(q, false, nil); !ok {
		t.Error("an eager build did not start on a free queue")
	} else {
		r()
	}
}

// TestBuildQueueHurry: a queued eager build that somebody starts waiting
// for becomes urgent and starts.
func TestBuildQueueHurry(t *testing.T) {
	q := newBuildQueue(1, nil)
	hold, _ := tryAcquire(q, false, nil)
	defer hold()
	hurry := make(chan struct{})
	got := make(chan func(), 1)
	go func() {
		r, err := q.acquire(context.Background(), false, hurry)
		if err == nil {
			got <- r
		}
	}()
	select {
	case <-got:
		t.Fatal("an eager build started beyond the limit")
	case <-time.After(100 * time.Millisecond):
	}
	if u, e := q.depth(); u != 0 || e != 1 {
		t.Errorf("depth = %d urgent, %d eager; want 0, 1", u, e)
	}
	close(hurry)
	select {
	case r := <-got:
		r()
	case <-time.After(2 * time.Second):
		t.Fatal("a hurried build did not start")
	}
}

// TestBuildQueueCancel: a build called off while waiting leaves the
// queue as it was.
func TestBuildQueueCancel(t *testing.T) {
	q := newBuildQueue(1, nil)
	hold, _ := tryAcquire(q, true, nil)
	if _, ok := tryAcquire(q, true, nil); ok {
		t.Fatal("beyond the limit")
	}
	if u, e := q.depth(); u != 0 || e != 0 {
		t.Errorf("a called-off build is still queued: %d, %d", u, e)
	}
	hold()
	if r, ok := tryAcquire(q, true, nil); !ok {
		t.Error("the slot was not given back")
	} else {
		r()
	}
}
